"""The computed explanations of the LM experiments' reports, on hand-made curves and records."""
from experiments import sft_dynamics
from experiments.claims import Claim


def _claim(text, passed):
    return Claim("sft_dynamics", text, "paper", passed, {"mean": 0.0, "std": 0.0}, (0,))


def test_sft_explanation_cites_the_decomposition_for_each_failed_claim():
    steps = [0, 10, 20, 30]
    curves = [{"steps": steps,
               "logps": {"chosen": [-60, -40, -30, -25], "rejected": [-70, -50, -40, -35],
                         "shuffled_chosen": [-90, -80, -80, -80], "argmax_chosen": [-10, -12, -14, -15]},
               "a_norm": [20.0, 19.8, 19.6, 19.5], "off_argmax": [-5.0, -3.0, -2.0, -1.0]}]
    records = [(0, st, {"predicted": {"chosen": 1.0 / st, "rejected": 0.9 / st, "shuffled_chosen": (0.05 if st < 20 else 0.0)}})
               for st in (5, 10, 20, 30)]
    rows = [_claim("SFT: chosen log-prob rises (end - start, nats)", True),
            _claim("SFT: rejected rises early then falls (peak - start, nats; end - peak in 'fall')", False),
            _claim("SFT: shuffled_chosen falls (end - start, nats)", False),
            _claim("SFT: argmax path y* along chosen rises (end - start, nats)", False)]
    lines = sft_dynamics.explanation(curves, records, rows)
    assert len(lines) == 3
    rejected, shuffled, star = lines
    # early half = steps 5, 10: (0.18 + 0.09) / 2; late half = 20, 30: (0.045 + 0.03) / 2
    assert "`rejected` (end − start +35.0 nats)" in rejected and "+0.135 nats/step" in rejected and "+0.037" in rejected
    assert "0.90× the push on chosen" in rejected and "no turn-down" in rejected
    assert "`shuffled_chosen`" in shuffled and "Its rise came early" in shuffled
    assert "50.0 nats above chosen at the start and 10.0 at the end" in star and "‖A‖_F changed -0.500" in star
    assert sft_dynamics.explanation(curves, records, rows[:1]) == []
