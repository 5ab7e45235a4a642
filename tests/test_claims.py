"""experiments.claims: the claims.json convention (rows, kinds, effect sizes, validation)."""
import json
import math

import pytest

from experiments.claims import Claim, ClaimError, claims_table, effect, read_claims, write_claims


def test_effect_matches_statistics():
    e = effect([1.0, 2.0, 4.0], unit="nats")
    assert e["mean"] == pytest.approx(7 / 3)
    assert e["std"] == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    assert (e["min"], e["max"], e["unit"], e["per_seed"]) == (1.0, 4.0, "nats", [1.0, 2.0, 4.0])
    assert effect([3.0])["std"] == 0.0
    with pytest.raises(ClaimError):
        effect([])


def test_round_trip_and_validation(tmp_path):
    rows = [Claim("x", "a holds", "check", True, effect([0.1, 0.2, 0.3]), (0, 1, 2)),
            Claim("x", "b as in the paper", "paper", False, {"delta": float("nan")}, (0, 1, 2))]
    path = write_claims(tmp_path, rows)
    loaded = read_claims(path)
    assert [r["kind"] for r in loaded] == ["check", "paper"]
    assert loaded[1]["value"]["delta"] == "nan"  # JSON has no NaN: kept visible as a string
    table = claims_table(loaded)
    assert "| PASS | check | x | a holds | 0.2 ± 0.1 | 3 |" in table and "FAIL" in table
    with pytest.raises(ClaimError, match="kind"):
        Claim("x", "c", "guess", True, 1, (0,))
    with pytest.raises(ClaimError, match="seeds"):
        Claim("x", "c", "check", True, 1, ())
    path.write_text(json.dumps([{"experiment": "x", "claim": "c", "kind": "check", "passed": True}]))
    with pytest.raises(ClaimError, match="row 0 lacks"):
        read_claims(path)
