"""benchmarks/structured_profile.py runs its phases on a small synthetic layer and finds the blocked
elimination picks the previous implementation's channels."""

from conftest import load_benchmark

bench = load_benchmark("structured_profile")


def test_profile_of_a_small_layer_compares_with_the_previous_code():
    row = bench.profile(96, 16, 512, 0.3, compare=True)
    assert row["same_order"] and row["same_kept"]
    assert {"gram_s", "elimination_s", "refit_s", "elimination_old_s", "refit_old_s"} <= set(row)
