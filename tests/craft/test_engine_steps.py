"""The engine's evasion-era options: the l2 steepest step, keep_best, early_stop with done flags
(finished samples leave, restarts skip them), APGD's checkpoints and step-size halving, Free."""

from __future__ import annotations

import pytest
import torch

from mlaudit.craft import Free, L2Ball, LinfBall, apgd_checkpoints, craft, engine


def test_l2_pgd_step_has_length_step_size() -> None:
    x = torch.full((3, 1, 2, 2), 0.5)
    res = craft(lambda xa, idx: (xa * torch.tensor([1.0, 2.0, 0.0, 0.0]).view(1, 1, 2, 2)).flatten(1).sum(1), x,
                constraint=L2Ball(1.0), steps=1, optimizer="pgd", lr=0.1, schedule="constant")
    norms = res.delta.flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.full((3,), 0.1))
    torch.testing.assert_close(res.delta[0, 0, 0], -0.1 * torch.tensor([1.0, 2.0]) / 5 ** 0.5)


def test_keep_best_returns_the_best_iterate_not_the_last() -> None:
    x = torch.zeros(2, 1)
    # minimum at 0.05; fixed steps of 0.04 overshoot it: 0.04 (loss .0001), 0.08 (.0009), 0.12, ...
    obj = lambda xa, idx: (xa[:, 0] - 0.05) ** 2  # noqa: E731
    last = craft(obj, x, constraint=Free(), steps=5, optimizer="pgd", lr=0.04, schedule="constant")
    best = craft(obj, x, constraint=Free(), steps=5, optimizer="pgd", lr=0.04, schedule="constant", keep_best=True)
    assert best.per_sample is not None and best.per_sample.max() <= last.per_sample.min()
    torch.testing.assert_close(best.delta, torch.full((2, 1), 0.04))


def test_early_stop_drops_done_samples_and_skips_them_in_restarts() -> None:
    x = torch.tensor([[0.0], [0.5], [0.9]])
    seen: list[int] = []

    def obj(xa: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append(len(idx))
        return -xa[:, 0], xa[:, 0] >= 0.94  # push up; done past 0.94

    res = craft(obj, x, constraint=LinfBall(0.2), steps=4, optimizer="pgd", lr=0.25, schedule="constant",
                restarts=3, early_stop=True, keep_best=True)
    assert res.done is not None and res.done.tolist() == [False, False, True]
    assert seen[:3] == [3, 3, 2]  # the third sample is done after one step, then leaves
    assert sum(seen[5:]) == 2 * 2 * 5  # two more restarts, only on the two unfinished samples
    assert float(res.delta[2, 0]) < 0.06  # the done sample keeps its first successful point (0.95)


@pytest.mark.parametrize("optimizer", ["pgd", "apgd"])
def test_early_stop_holding_done_samples_until_half_are_done_gives_the_same_result(
        optimizer: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # the CUDA policy (done samples stay in the batch, fixed, until their passes left reach 2 of the batch; 4 here)
    # against the CPU one (they leave at once): per-sample objectives, so every sample's result must be the same
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(40, 3, generator=gen)
    w = torch.randn(3, generator=gen)
    thresh = torch.linspace(0.05, 1.5, 40)
    seen: dict[float, list[int]] = {}

    def run(shrink: float, lagged: bool = False):
        monkeypatch.setattr(engine, "_shrink_passes", lambda x: shrink)
        monkeypatch.setattr(engine, "_lagged_counts", lambda x: lagged)
        sizes = seen.setdefault(shrink + 10 * lagged, [])

        def obj(xa: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            sizes.append(len(idx))
            s = xa @ w - x[idx] @ w
            return -s, s >= thresh[idx]

        return craft(obj, x, constraint=LinfBall(0.4), steps=12, optimizer=optimizer, lr=0.1, schedule="constant",
                     restarts=2, early_stop=True, keep_best=True, init="random",
                     generator=torch.Generator().manual_seed(0))

    now, held = run(0.0), run(4.0)
    assert now.done is not None and held.done is not None and now.done.tolist() == held.done.tolist()
    assert 0 < int(now.done.sum()) < 40
    torch.testing.assert_close(held.delta, now.delta)
    torch.testing.assert_close(held.per_sample, now.per_sample)
    assert len(set(seen[4.0])) < len(set(seen[0.0]))  # fewer distinct batch sizes
    assert sum(seen[4.0]) > sum(seen[0.0])  # paid for with passes over held samples
    # CUDA reads the done counts a step late (no blocking read per step): decisions lag, results do not
    for shrink in (0.0, 4.0):
        lag = run(shrink, lagged=True)
        assert lag.done is not None and lag.done.tolist() == now.done.tolist()
        torch.testing.assert_close(lag.delta, now.delta)
        torch.testing.assert_close(lag.per_sample, now.per_sample)
        assert sum(seen[shrink + 10]) >= sum(seen[shrink])  # at most extra passes over held samples


def test_apgd_checkpoints_follow_the_paper() -> None:
    # p = 0, .22, .41, .57, .70, .80, .87, .93, .99 -> ceil(p * 100)
    assert sorted(apgd_checkpoints(100)) == [22, 41, 57, 70, 80, 87, 93, 99]


def test_apgd_halves_a_stalled_step_and_returns_to_the_best_point() -> None:
    x = torch.zeros(1, 1)
    # |x - 0.3| with an initial step 2 * eps = 1.0: it overshoots; halvings bring it near 0.3
    res = craft(lambda xa, idx: (xa[:, 0] - 0.3).abs(), x, constraint=LinfBall(0.5), steps=100, optimizer="apgd",
                lr=2.0, keep_best=True)
    assert abs(float(res.delta) - 0.3) < 0.02


@pytest.mark.parametrize("shrink", [0.0, 2.0])
def test_lagged_counts_when_every_sample_finishes_at_once(shrink: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA policy reads the done count a step late: when every sample is done at the same step, the
    late count has not seen it yet and the compaction empties the batch; the run still ends with the same
    result as the immediate count."""
    x = torch.zeros(6, 2)

    def obj(xa: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return -xa.sum(1), xa.sum(1) >= 0.15  # every sample is done after the first step of 0.1 per coordinate

    out = {}
    for lagged in (False, True):
        monkeypatch.setattr(engine, "_shrink_passes", lambda x: shrink)
        monkeypatch.setattr(engine, "_lagged_counts", lambda x, lagged=lagged: lagged)
        out[lagged] = craft(obj, x, constraint=LinfBall(0.5), steps=6, optimizer="pgd", lr=0.2, schedule="constant",
                            restarts=2, early_stop=True, keep_best=True)
    assert out[True].done is not None and bool(out[True].done.all())
    torch.testing.assert_close(out[True].delta, out[False].delta)
    torch.testing.assert_close(out[True].delta, torch.full((6, 2), 0.1))


@pytest.mark.parametrize("early_stop", [False, True])
def test_final_eval_off_returns_the_same_last_iterate_with_one_pass_less(early_stop: bool) -> None:
    """``final_eval=False`` (FGSM and other attacks without keep-best) skips scoring the last iterate: the same
    perturbation, one forward pass fewer; refused where that score is needed (keep-best, restarts)."""
    gen = torch.Generator().manual_seed(1)
    x, w = torch.rand(8, 3, generator=gen), torch.randn(3, generator=gen)
    calls: dict[bool, int] = {}

    def run(final_eval: bool):
        calls[final_eval] = 0

        def obj(xa: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            calls[final_eval] += 1
            s = xa @ w
            return -s, s > 2.0

        return craft(obj, x, constraint=LinfBall(0.3), steps=3, optimizer="pgd", lr=0.4, schedule="constant",
                     early_stop=early_stop, final_eval=final_eval)

    full, short = run(True), run(False)
    torch.testing.assert_close(short.delta, full.delta)
    assert calls[False] == calls[True] - 1
    with pytest.raises(Exception, match="final_eval=False"):
        craft(lambda xa, idx: xa.sum(1), x, constraint=LinfBall(0.3), steps=2, keep_best=True, final_eval=False)
    with pytest.raises(Exception, match="final_eval=False"):
        craft(lambda xa, idx: xa.sum(1), x, constraint=LinfBall(0.3), steps=2, restarts=2, final_eval=False)


@pytest.mark.parametrize("shrink,lagged", [(0.0, False), (2.0, False), (0.0, True), (2.0, True)])
def test_early_stop_without_keep_best_holds_done_samples_and_moves_the_rest(
        shrink: float, lagged: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without keep-best (``pgd`` with one restart) the engine copies iterates out only where it drops rows or
    stops: a sample flagged done returns the iterate that reached the goal, every other sample the last
    iterate of the same run without early stop, under every drop policy (at once / at half, read late)."""
    gen = torch.Generator().manual_seed(5)
    x, w = torch.rand(30, 3, generator=gen), torch.randn(3, generator=gen)
    thresh = torch.linspace(0.1, 2.0, 30)

    def obj(xa: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = xa @ w - x[idx] @ w
        return -s, s >= thresh[idx]

    def run(early_stop: bool):
        return craft(obj, x, constraint=LinfBall(0.5), steps=10, optimizer="pgd", lr=0.07, schedule="constant",
                     early_stop=early_stop, init="random", generator=torch.Generator().manual_seed(0))

    free = run(False)
    monkeypatch.setattr(engine, "_shrink_passes", lambda x: shrink)
    monkeypatch.setattr(engine, "_lagged_counts", lambda x: lagged)
    res = run(True)
    assert res.done is not None
    done = res.done
    assert 0 < int(done.sum()) < 30
    gain = (res.delta @ w)
    assert bool((gain[done] >= thresh[done]).all())  # held where the goal was reached
    assert bool((gain[done] < (free.delta @ w)[done] + 1e-6).all())  # and not moved on past it
    torch.testing.assert_close(res.delta[~done], free.delta[~done])  # the rest: the same last iterate


def test_done_samples_leave_once_their_remaining_passes_pay_for_a_new_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA drop rule: done samples leave once n_done x steps_left >= 2 x the batch in work. A third of the batch
    done at the first step of ten leaves at once (3.3 passes saved); the same third done two steps before the end
    stays (0.67 passes: a new shape would cost more than it saves)."""
    monkeypatch.setattr(engine, "_shrink_passes", lambda x: 2.0)
    x = torch.zeros(30, 1)

    def sizes_when_done_at(at: int) -> list[int]:
        sizes: list[int] = []
        calls = [0]

        def obj(xa: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            sizes.append(len(idx))
            calls[0] += 1
            done = (idx < 10) & (calls[0] > at)  # the first ten samples are done from evaluation `at` on
            return -xa[:, 0], done

        craft(obj, x, constraint=LinfBall(1.0), steps=10, optimizer="pgd", lr=0.01, schedule="constant",
              early_stop=True)
        return sizes

    early, late = sizes_when_done_at(1), sizes_when_done_at(8)
    assert early == [30, 30] + [20] * 9  # done at evaluation 1 (step 1, 9 left): 10 x 9 >= 2 x 30, so they leave
    assert late == [30] * 11  # done at evaluation 8 (2 left): 10 x 2 < 60, held to the end
