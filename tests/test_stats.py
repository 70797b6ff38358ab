"""Report statistics: Holm, paired comparisons with the best, the generalisation bootstrap,
and comparisons across datasets (checked against scipy and Demšar 2006)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats as sps

from medxfer.report.stats import (
    NEMENYI_Q,
    VERDICT_BEST,
    VERDICT_SAME,
    VERDICT_WORSE,
    PoolResampler,
    StatsInputError,
    bootstrap_interval,
    bootstrap_intervals,
    compare_across_datasets,
    compare_with_best,
    friedman_from_ranks,
    holm_adjust,
    min_wilcoxon_p,
    nemenyi_cd,
    nemenyi_q,
    rank_cliques,
    rank_matrix,
)

# ------------------------------------------------------------------------------- Holm


def test_holm_hand_computed():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04; the running
    # maximum makes the last 0.06; back in input order:
    assert holm_adjust([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm_adjust([0.3, 0.4]) == pytest.approx([0.6, 0.6])
    assert holm_adjust([0.6, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm_adjust([0.02]) == pytest.approx([0.02])  # one test: unchanged
    assert holm_adjust([0.01, 0.01, 0.2]) == pytest.approx([0.03, 0.03, 0.2])  # ties keep their order
    assert len(holm_adjust([])) == 0


def _holm_rejections(p: np.ndarray, alpha: float) -> set[int]:
    """The step-down procedure as stated by Holm (1979): reject in ascending order while
    p_(i) <= alpha / (m - i + 1), stop at the first that is not."""
    order = np.argsort(p, kind="stable")
    out = set()
    for i, j in enumerate(order):
        if p[j] > alpha / (len(p) - i):
            break
        out.add(int(j))
    return out


def test_holm_rejects_what_the_step_down_procedure_rejects():
    rng = np.random.default_rng(3)
    for _ in range(200):
        p = rng.uniform(0, 0.08, size=int(rng.integers(1, 12)))
        for alpha in (0.05, 0.01):
            assert {i for i, q in enumerate(holm_adjust(p)) if q <= alpha} == _holm_rejections(p, alpha)


def test_holm_rejects_bad_p_values():
    with pytest.raises(StatsInputError, match="p values must lie in"):
        holm_adjust([0.1, 1.2])
    with pytest.raises(StatsInputError, match="NaN"):
        holm_adjust([0.1, float("nan")])


# ----------------------------------------------------------------- within a dataset


def _episodes(rng: np.random.Generator, mean: float, n: int = 600, steps: int = 30) -> np.ndarray:
    """Episode accuracies in steps of 1/steps around ``mean``."""
    return np.clip(np.round((mean + rng.normal(0, 0.08, n)) * steps) / steps, 0, 1)


def test_compare_with_best_matches_scipy():
    rng = np.random.default_rng(0)
    best = _episodes(rng, 0.80)
    worse = np.clip(best - np.round(rng.normal(0.03, 0.05, 600) * 30) / 30, 0, 1)
    close = best.copy()
    flip = rng.choice(600, 40, replace=False)
    close[flip[:20]] -= 1 / 30  # 20 episodes one query worse, 20 one query better:
    close[flip[20:]] += 1 / 30  # the same mean, almost all differences zero
    close = np.clip(close, 0, 1)
    res = compare_with_best({"worse": worse, "best": best, "close": close}, dataset="toy")
    assert res.best == "best" and res.n_episodes == 600 and res.zero_method == "zsplit"
    assert [r.model for r in res.rows] == ["worse", "best", "close"]  # input order kept

    p_t, p_w = {}, {}
    for name, x in (("worse", worse), ("close", close)):
        row = res.row(name)
        d = np.round(x - best, 12)  # as compare_with_best does, see the next test
        t = sps.ttest_rel(x, best)
        w = sps.wilcoxon(d, zero_method="zsplit")
        assert row.t_statistic == pytest.approx(t.statistic) and row.t_p_value == pytest.approx(t.pvalue)
        assert row.wilcoxon_statistic == pytest.approx(w.statistic)
        assert row.wilcoxon_p_value == pytest.approx(w.pvalue)
        half = sps.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
        assert row.difference == pytest.approx(100 * d.mean())
        assert (row.ci_low, row.ci_high) == pytest.approx((100 * (d.mean() - half), 100 * (d.mean() + half)))
        assert row.zero_differences == int(np.sum(d == 0))
        p_t[name], p_w[name] = t.pvalue, w.pvalue
    # Holm over the k-1 = 2 comparisons, for each test separately
    ht = holm_adjust([p_t["worse"], p_t["close"]])
    hw = holm_adjust([p_w["worse"], p_w["close"]])
    assert (res.row("worse").t_p_holm, res.row("close").t_p_holm) == pytest.approx(tuple(ht))
    assert (res.row("worse").wilcoxon_p_holm, res.row("close").wilcoxon_p_holm) == pytest.approx(tuple(hw))

    assert res.row("best").verdict == VERDICT_BEST
    assert res.row("worse").verdict == VERDICT_WORSE
    assert res.row("close").verdict == VERDICT_SAME
    assert res.row("close").zero_differences >= 555
    assert "not a new test set" in res.interval_covers
    d = res.to_dict()
    json.dumps(d, allow_nan=False)
    best_row = next(r for r in d["rows"] if r["model"] == "best")
    assert best_row["t_p_value"] is None and best_row["difference"] == 0.0


def test_compare_with_best_zero_method_is_passed_on():
    rng = np.random.default_rng(1)
    a, b = _episodes(rng, 0.7, 80), _episodes(rng, 0.72, 80)
    # differences of multiples of 1/30 carry float noise (21/30 - 20/30 != 11/30 - 10/30 in the
    # last bit), which would break ties between equal differences; they are compared rounded
    d = np.round(a - b, 12)
    assert len(np.unique(d)) < len(np.unique(a - b))  # the noise is real
    for zm in ("pratt", "wilcox", "zsplit"):
        row = compare_with_best({"a": a, "b": b}, zero_method=zm).row("a")
        assert row.wilcoxon_p_value == pytest.approx(sps.wilcoxon(d, zero_method=zm).pvalue)


def test_compare_with_best_identical_and_constant_differences():
    base = np.array([0.5, 0.6, 0.7, 0.8])
    res = compare_with_best({"a": base, "b": base.copy(), "c": base - 0.1})
    assert res.best == "a"  # equal means: the first one
    b = res.row("b")
    assert (b.t_p_value, b.wilcoxon_p_value, b.verdict) == (1.0, 1.0, VERDICT_SAME)
    c = res.row("c")  # always exactly 10 points worse: no spread, p 0
    assert c.t_p_value == 0.0 and c.verdict == VERDICT_WORSE
    assert c.ci_low == pytest.approx(-10.0) and c.ci_high == pytest.approx(-10.0)


@pytest.mark.parametrize(("acc", "message"), [
    ({"a": [0.5, 0.6]}, "at least two models"),
    ({"a": [0.5, 0.6], "b": [0.5]}, "different numbers of episodes"),
    ({"a": [0.5], "b": [0.4]}, "at least two episodes"),
    ({"a": [0.5, 60.0], "b": [0.5, 0.6]}, "fractions in \\[0, 1\\]"),
    ({"a": [0.5, float("nan")], "b": [0.5, 0.6]}, "model 'a': contains NaN"),
])
def test_compare_with_best_rejects_bad_input(acc, message):
    with pytest.raises(StatsInputError, match=message):
        compare_with_best(acc, dataset="d")


# ------------------------------------------------------------ generalisation bootstrap


def _prototype_accuracy(feats: np.ndarray, labels: np.ndarray, pool: np.ndarray, seed: int,
                        n_shot: int = 5, n_query: int = 5, episodes: int = 40) -> float:
    """2-way prototypical episodes drawn with ``seed`` from the positions of ``pool``; a
    query never repeats a record index that is in the episode's support."""
    rng = np.random.default_rng(seed)
    lab = labels[pool]
    by_class = [np.flatnonzero(lab == c) for c in (0, 1)]
    correct = total = 0
    for _ in range(episodes):
        protos, queries = [], []
        for pos in by_class:
            order = rng.permutation(pos)
            support = order[:n_shot]
            banned = set(pool[support].tolist())
            rest = [p for p in order[n_shot:] if pool[p] not in banned][:n_query]
            protos.append(feats[pool[support]].mean(axis=0))
            queries.append(feats[pool[rest]])
        protos_a = np.stack(protos)
        for c, q in enumerate(queries):
            d2 = ((q[:, None, :] - protos_a[None]) ** 2).sum(-1)
            correct += int(np.sum(d2.argmin(1) == c))
            total += len(q)
    return correct / total


def _toy_features(rng: np.random.Generator, n: int, separation: float, per_patient: int = 1,
                  patient_sd: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two classes in 8-D, ``per_patient`` images per patient sharing a patient offset."""
    n_pat = n // per_patient
    pat_label = np.arange(n_pat) % 2
    offsets = rng.normal(0, patient_sd, (n_pat, 8))
    groups = np.repeat(np.arange(n_pat), per_patient)
    labels = pat_label[groups]
    centres = np.zeros((2, 8))
    centres[1, 0] = separation
    feats = centres[labels] + offsets[groups] + rng.normal(0, 1, (len(groups), 8))
    return feats, labels, groups


def test_bootstrap_interval_contains_estimate_and_is_seeded():
    rng = np.random.default_rng(5)
    feats, labels, _ = _toy_features(rng, 160, separation=1.5)

    def acc(pool: np.ndarray) -> float:
        return _prototype_accuracy(feats, labels, pool, seed=11)

    a = bootstrap_interval(acc, len(labels), n_boot=60, seed=2, strata=labels, name="accuracy")
    again = bootstrap_interval(acc, len(labels), n_boot=60, seed=2, strata=labels, name="accuracy")
    other = bootstrap_interval(acc, len(labels), n_boot=60, seed=3, strata=labels, name="accuracy")
    assert a == again and (a.low, a.high) != (other.low, other.high)
    assert a.estimate == pytest.approx(acc(np.arange(len(labels))))
    assert a.low <= a.estimate <= a.high and a.high - a.low > 0.01
    assert (a.unit, a.n_units, a.n_boot, a.level) == ("image", 160, 60, 0.95)
    json.dumps(a.to_dict(), allow_nan=False)


def test_bootstrap_difference_of_two_models_covers_the_population_difference():
    """Two 'models' = two feature sets of the same images. The interval of their accuracy
    difference on a 200-image pool should cover the difference measured on 4,000 fresh
    images with the same kind of episodes (one fixed-seed draw, so deterministic)."""
    rng = np.random.default_rng(8)
    f_good, labels, _ = _toy_features(rng, 200, separation=2.0)
    f_weak = f_good.copy()
    f_weak[:, 0] = f_weak[:, 0] * 0.4 + rng.normal(0, 1, len(labels))  # the class signal blurred

    def stat(pool: np.ndarray) -> dict[str, float]:
        g = _prototype_accuracy(f_good, labels, pool, seed=4)
        w = _prototype_accuracy(f_weak, labels, pool, seed=4)
        return {"good": g, "weak": w, "difference": g - w}

    res = bootstrap_intervals(stat, np.arange(len(labels)), n_boot=80, seed=0, strata=labels)
    assert set(res) == {"good", "weak", "difference"}
    d = res["difference"]
    assert d.estimate == pytest.approx(res["good"].estimate - res["weak"].estimate)
    big_good, big_labels, _ = _toy_features(np.random.default_rng(99), 4000, separation=2.0)
    big_weak = big_good.copy()
    big_weak[:, 0] = big_weak[:, 0] * 0.4 + np.random.default_rng(100).normal(0, 1, 4000)
    pool = np.arange(4000)
    truth = (_prototype_accuracy(big_good, big_labels, pool, seed=1, episodes=200)
             - _prototype_accuracy(big_weak, big_labels, pool, seed=1, episodes=200))
    assert d.low < truth < d.high
    assert d.low > 0  # the good features are better, and the interval says so


def test_patient_bootstrap_is_wider_when_images_of_a_patient_are_alike():
    rng = np.random.default_rng(21)
    feats, labels, groups = _toy_features(rng, 240, separation=1.5, per_patient=6, patient_sd=2.0)

    def acc(pool: np.ndarray) -> float:
        return _prototype_accuracy(feats, labels, pool, seed=5)

    by_image = bootstrap_interval(acc, 240, n_boot=60, seed=1, strata=labels)
    by_patient = bootstrap_interval(acc, 240, n_boot=60, seed=1, groups=groups, strata=labels)
    assert by_patient.unit == "patient" and by_patient.n_units == 40
    assert by_patient.estimate == by_image.estimate
    assert by_patient.high - by_patient.low > 1.25 * (by_image.high - by_image.low)


def test_pool_resampler_keeps_strata_and_patients():
    pool = np.arange(100, 130)  # record indices need not start at 0
    groups = np.repeat(np.arange(10), 3)
    strata = np.repeat(np.arange(10) % 2, 3)
    r = PoolResampler(pool, groups=groups, strata=strata)
    rng = np.random.default_rng(0)
    for _ in range(20):
        drawn = r.draw(rng)
        assert len(drawn) == 30 and set(drawn) <= set(pool)
        pos = drawn - 100
        assert np.sum(strata[pos] == 0) == 15  # five patients of each class, three images each
        counts = np.bincount(groups[pos], minlength=10)
        assert np.all(counts % 3 == 0)  # a drawn patient brings all three images
    plain = PoolResampler(5).draw(np.random.default_rng(1))
    assert len(plain) == 5 and plain.max() < 5
    with pytest.raises(StatsInputError, match="constant within a group"):
        PoolResampler(4, groups=[0, 0, 1, 1], strata=[0, 1, 1, 1])
    with pytest.raises(StatsInputError, match="one id per pool entry"):
        PoolResampler(4, groups=[0, 0, 1])


def test_bootstrap_rejects_a_statistic_that_changes_its_keys():
    calls = iter(range(100))

    def stat(pool: np.ndarray) -> dict[str, float]:
        return {"a": 1.0} if next(calls) == 0 else {"b": 1.0}

    with pytest.raises(StatsInputError, match="returned keys"):
        bootstrap_intervals(stat, 10, n_boot=5)


# ------------------------------------------------------------------ across datasets

# Demšar (2006), "Statistical Comparisons of Classifiers over Multiple Data Sets", JMLR 7:1-30,
# Table 6 (= Table 2 plus two more columns): AUC of C4.5, C4.5+m, C4.5+cf and C4.5+m+cf on 14
# UCI data sets, in the order adult, breast cancer, breast cancer wisconsin, cmc, ionosphere,
# iris, liver disorders, lung cancer, lymphography, mushroom, primary tumor, rheum, voting,
# wine.
DEMSAR_MODELS = ["C4.5", "C4.5+m", "C4.5+cf", "C4.5+m+cf"]
DEMSAR_AUC = np.array([
    [0.763, 0.768, 0.771, 0.798], [0.599, 0.591, 0.590, 0.569], [0.954, 0.971, 0.968, 0.967],
    [0.628, 0.661, 0.654, 0.657], [0.882, 0.888, 0.886, 0.898], [0.936, 0.931, 0.916, 0.931],
    [0.661, 0.668, 0.609, 0.685], [0.583, 0.583, 0.563, 0.625], [0.775, 0.838, 0.866, 0.875],
    [1.000, 1.000, 1.000, 1.000], [0.940, 0.962, 0.965, 0.962], [0.619, 0.666, 0.614, 0.669],
    [0.972, 0.981, 0.975, 0.975], [0.957, 0.978, 0.946, 0.970],
])
# The ranks printed in Table 6. They equal the ranks of the printed AUCs except on voting,
# where the paper ranks C4.5+cf 2 and C4.5+m+cf 3 (values equal to three decimals, so the
# unprinted digits decided); average ranks of the printed AUCs are 2.929 and 1.929 there.
DEMSAR_RANKS = np.array([
    [4, 3, 2, 1], [1, 2, 3, 4], [4, 1, 2, 3], [4, 1, 3, 2], [4, 2, 3, 1], [1, 2.5, 4, 2.5],
    [3, 2, 4, 1], [2.5, 2.5, 4, 1], [4, 3, 2, 1], [2.5, 2.5, 2.5, 2.5], [4, 2.5, 1, 2.5],
    [3, 2, 4, 1], [4, 1, 2, 3], [3, 1, 4, 2],
])


def _scores(mat: np.ndarray, models: list[str]) -> dict[str, dict[str, float]]:
    return {f"d{i}": dict(zip(models, row)) for i, row in enumerate(mat)}


def test_friedman_and_nemenyi_reproduce_demsar_2006_worked_example():
    """Demšar (2006), JMLR 7:1-30, section 3.2.2 (pages 12-14), on the ranks of Table 6:
    average ranks 3.143, 2.000, 2.893, 1.964; chi2_F = 9.28 and F_F = 3.69 (no tie
    correction in the paper's formulas); the critical value of F(3, 39) at alpha 0.05 is
    2.85, so the null is rejected; Nemenyi CD = 2.569 sqrt(4*5 / (6*14)) = 1.25 at 0.05,
    which even the largest difference of mean ranks (1.179) does not reach, and
    CD = 1.12 at 0.10 (q = 2.291), where C4.5 is worse than C4.5+m and C4.5+m+cf.
    q values: Demšar's Table 5(a)."""
    assert rank_matrix(-DEMSAR_RANKS) == pytest.approx(DEMSAR_RANKS)
    fr = friedman_from_ranks(DEMSAR_RANKS, tie_corrected=False)
    assert np.round(DEMSAR_RANKS.mean(axis=0), 3) == pytest.approx([3.143, 2.000, 2.893, 1.964])
    assert round(fr.chi2, 2) == 9.28 and round(fr.iman_davenport_f, 2) == 3.69
    assert (fr.df, fr.f_df1, fr.f_df2) == (3, 3, 39)
    assert round(float(sps.f.ppf(0.95, 3, 39)), 2) == 2.85 and fr.f_p_value < 0.05
    assert fr.p_value == pytest.approx(sps.chi2.sf(fr.chi2, 3))
    assert round(nemenyi_cd(4, 14, 0.05), 2) == 1.25
    assert round(nemenyi_cd(4, 14, 0.10), 2) == 1.12

    # the same through compare_across_datasets, ranking the published ranks (lower = better)
    res05 = compare_across_datasets(_scores(DEMSAR_RANKS, DEMSAR_MODELS), higher_is_better=False,
                                    tie_corrected=False)
    assert res05.models == ["C4.5+m+cf", "C4.5+m", "C4.5+cf", "C4.5"]
    assert res05.friedman == fr
    assert res05.nemenyi_cliques == [res05.models]  # nothing apart at 0.05
    res10 = compare_across_datasets(_scores(DEMSAR_RANKS, DEMSAR_MODELS), higher_is_better=False,
                                    alpha=0.10, tie_corrected=False)
    assert res10.nemenyi_cliques == [["C4.5+m+cf", "C4.5+m", "C4.5+cf"], ["C4.5+cf", "C4.5"]]


def test_across_datasets_on_demsar_auc_matches_scipy():
    res = compare_across_datasets(_scores(DEMSAR_AUC, DEMSAR_MODELS))
    mr = res.mean_ranks
    assert [mr[m] for m in DEMSAR_MODELS] == pytest.approx([44 / 14, 28 / 14, 41 / 14, 27 / 14])
    fs = sps.friedmanchisquare(*DEMSAR_AUC.T)  # scipy corrects for ties, as we do by default
    assert res.friedman.chi2 == pytest.approx(fs.statistic) and res.friedman.p_value == pytest.approx(fs.pvalue)
    ps = []
    for pw in res.pairwise:
        a, b = DEMSAR_AUC[:, DEMSAR_MODELS.index(pw.model_a)], DEMSAR_AUC[:, DEMSAR_MODELS.index(pw.model_b)]
        w = sps.wilcoxon(a, b, zero_method="zsplit")
        assert pw.statistic == pytest.approx(w.statistic) and pw.p_value == pytest.approx(w.pvalue)
        ps.append(w.pvalue)
    assert [pw.p_holm for pw in res.pairwise] == pytest.approx(list(holm_adjust(ps)))
    assert res.n_pairs == 6 and res.any_pair_can_be_significant
    json.dumps(res.to_dict(), allow_nan=False)


def test_wilcoxon_reproduces_demsar_table_2():
    """Demšar (2006), section 3.1.3 and Table 2: C4.5+m against C4.5 on the 14 data sets,
    zero differences' ranks split evenly: R+ = 93, R- = 12; T = 12 is below the critical
    value 21 for N = 14 at alpha 0.05, so the difference is significant."""
    res = compare_across_datasets(_scores(DEMSAR_AUC[:, :2], DEMSAR_MODELS[:2]))
    pw = res.pair("C4.5", "C4.5+m")
    assert (pw.wins_a, pw.ties, pw.wins_b) == (2, 2, 10)
    assert pw.statistic == 12.0  # min(R+, R-)
    d = DEMSAR_AUC[:, 1] - DEMSAR_AUC[:, 0]
    r = sps.rankdata(np.abs(d))
    assert r[d > 0].sum() + r[d == 0].sum() / 2 == 93.0
    assert pw.p_value < 0.05 and pw.significant  # one pair: Holm changes nothing


def _consistent(n_datasets: int, n_models: int, seed: int) -> dict[str, dict[str, float]]:
    """Model i beats model i+1 on every dataset (the clearest possible order)."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.6, 0.8, size=(n_datasets, 1))
    steps = np.cumsum(rng.uniform(0.002, 0.01, size=(n_datasets, n_models)), axis=1)
    return _scores(base - steps, [f"model-{j:02d}" for j in range(n_models)])


def test_too_few_datasets_for_any_significant_pair_is_said_plainly():
    res = compare_across_datasets(_consistent(8, 13, seed=0))
    assert res.min_p == pytest.approx(2 / 2 ** 8) and round(res.min_p, 4) == 0.0078
    assert res.n_pairs == 78 and not res.any_pair_can_be_significant and res.datasets_needed == 12
    assert all(pw.p_value == pytest.approx(2 / 2 ** 8) for pw in res.pairwise)  # as low as it gets
    assert not any(pw.significant for pw in res.pairwise)
    assert res.cliques == [res.models]  # one bar over all 13
    assert "no pair can be significantly different" in res.statement and "78 pairs" in res.statement
    assert res.friedman.p_value < 1e-10  # the omnibus test does see the order
    assert res.mean_ranks["model-00"] == 1.0


def test_enough_datasets_separate_a_consistent_order():
    res = compare_across_datasets(_consistent(12, 13, seed=1))
    assert res.any_pair_can_be_significant and res.datasets_needed == 12
    assert all(pw.significant for pw in res.pairwise)  # 78 * 2/4096 = 0.038 <= 0.05
    assert res.cliques == []
    assert "78 pairs differ significantly" in res.statement


def test_min_wilcoxon_p_is_scipy_exact_minimum():
    for n in (5, 8, 10):
        assert min_wilcoxon_p(n) == pytest.approx(sps.wilcoxon(np.arange(1.0, n + 1), method="exact").pvalue)


def test_nemenyi_q_table_matches_the_studentized_range():
    for alpha, row in NEMENYI_Q.items():
        for k, q in zip(range(2, 11), row):
            assert nemenyi_q(k, alpha) == q
            assert sps.studentized_range.ppf(1 - alpha, k, np.inf) / math.sqrt(2) == pytest.approx(q, abs=1.5e-3)
    assert nemenyi_q(13, 0.05) == pytest.approx(3.313, abs=1e-3)  # beyond the table: computed


def test_rank_cliques():
    names = list("abcde")
    apart = {frozenset("ac"), frozenset("ad"), frozenset("ae"), frozenset("be"), frozenset("ce")}
    cliques = rank_cliques(names, lambda x, y: frozenset((x, y)) in apart)
    assert cliques == [["a", "b"], ["b", "c", "d"], ["d", "e"]]
    assert rank_cliques(names, lambda x, y: True) == []


def test_across_datasets_rejects_incomplete_or_bad_scores():
    with pytest.raises(StatsInputError, match="missing: b on d2"):
        compare_across_datasets({"d1": {"a": 0.5, "b": 0.6}, "d2": {"a": 0.5}})
    with pytest.raises(StatsInputError, match="at least two datasets"):
        compare_across_datasets({"d1": {"a": 0.5, "b": 0.6}})
    with pytest.raises(StatsInputError, match="not finite: b on d1"):
        compare_across_datasets({"d1": {"a": 0.5, "b": float("nan")}, "d2": {"a": 0.5, "b": 0.4}})
    with pytest.raises(StatsInputError, match="ranks 1..k"):
        friedman_from_ranks(np.array([[1, 1], [1, 2]]))


def test_bootstrap_with_the_fewshot_protocol_reuses_the_episode_seed():
    """The report's use: cached features, the protocol's own episode sampler with a fixed
    seed; on the original pool the bootstrap estimate is exactly the protocol's result."""
    from medxfer.protocols.fewshot import episode_accuracies, sample_episodes

    rng = np.random.default_rng(4)
    labels = np.repeat([0, 1], 40)
    features = rng.normal(0, 1, (80, 6)) + labels[:, None] * 0.8

    def accuracy(pool: np.ndarray) -> float:
        episodes, _ = sample_episodes(labels, 2, 5, 5, 30, seed=7, pool=pool)
        return float(episode_accuracies(features, episodes).mean())

    direct = float(episode_accuracies(features, sample_episodes(labels, 2, 5, 5, 30, seed=7)[0]).mean())
    res = bootstrap_interval(accuracy, 80, n_boot=25, seed=0, strata=labels)
    assert res.estimate == direct
    assert res.low < res.high and res.low <= direct <= res.high
