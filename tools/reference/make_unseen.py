"""Generate the unseen cases (tests/data/unseen) with the PyTorch reference (losses.py).

Usage: python3 tools/reference/make_unseen.py [OUT_DIR]

Same layout as tests/data/golden (see its README.md): one folder per case with
  x.npy (float32, n x d), labels.npy (int64, shuffled), manifest.json
  (`losses.NAME.{params, loss, grad[, inputs]}` plus case/d/n/normalized/seed),
  NAME.grad.npy (float64 dL/dX), cluster_nca.groups.npy (int64 k-means assignment).
Values are computed in float64 from the float32 x read back as float64.

In addition each folder gets `reference_f32.json`: the reference evaluated in float32 on
the same x, with its deviation from the float64 values (`loss_dev` relative, `grad_dev`
relative to the largest float64 gradient entry) and `f32_agrees` = both <= 1e-4. A
float32 kernel can only be held to the float64 values where the float32 reference already
agrees (otherwise a near-tie in a mining predicate flips in float32); tests/unseen.rs skips
the float32 check elsewhere, with a note.

Generator (golden/README.md): p classes x k members, rows standard normal then scaled to
unit length, labels a shuffled repeat of 0..p-1; uneven cases draw class sizes from a
range and leave the rows unnormalised (each unit row scaled by a uniform factor). All
draws come from numpy.random.default_rng(seed). Two cases go beyond the golden generator on
purpose (see CASES): `uneven_wide_d6` (rows up to 1.6 long, so |S| > 1 occurs) and
`clustered_p6k5_d12` (class structure, so the skip rules fire); and two cases override
js_div_knn_softmax's beta so that its JS term is not ~1e-40 (`extra`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import losses as ref  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.normpath(os.path.join(HERE, "..", "..", "tests", "data", "unseen"))
F32_TOL = 1e-4

# name, seed, d, class sizes (None: p x k), normalized, row-norm range for uneven rows
CASES = [
    # js_div_knn_softmax's JS term is ~1e-40 at the default beta = 40 (the golden cases and
    # the other unseen cases test only its knn part); a smaller beta makes it count:
    # ~17 of 35 at beta = 4 on p4k4_d8, 0.021 of 15 at beta = 6 on p6k6_d10.
    dict(case="p4k4_d8", seed=2000, d=8, p=4, k=4, extra={"js_div_knn_softmax": {"beta": 4.0}}),
    dict(case="p8k4_d16", seed=2100, d=16, p=8, k=4),
    dict(case="p12k3_d20", seed=2200, d=20, p=12, k=3),
    dict(case="p6k6_d10", seed=2300, d=10, p=6, k=6, extra={"js_div_knn_softmax": {"beta": 6.0}}),
    dict(case="uneven_d9", seed=2400, d=9, sizes=[2, 3, 4, 5, 6, 7], norms=(0.35, 1.05)),
    dict(case="p10k5_d32", seed=2500, d=32, p=10, k=5),
    # Beyond the golden generator's range: rows longer than 1, so some |S| > 1 (histogram's
    # clamp into [-1, 1]) and distances beyond 2.
    dict(case="uneven_wide_d6", seed=2600, d=6, sizes=[3, 4, 5, 6], norms=(0.5, 1.6)),
    # Beyond the golden generator: rows drawn around class centres (unit centres + noise of
    # norm ~1.3, then unit length), so classes separate partly and the skip rules fire
    # (bin_deviance / margin_positive / binomial_hard / multi_similarity / hard_mining skip
    # anchors; gaussian_metric takes its B'-only branch; center_loss drops some an_k).
    dict(case="clustered_p6k5_d12", seed=2701, d=12, p=6, k=5, spread=1.3),
]


def make_batch(spec):
    rng = np.random.default_rng(spec["seed"])
    if "sizes" in spec:
        sizes = spec["sizes"]
    else:
        sizes = [spec["k"]] * spec["p"]
    n, d = sum(sizes), spec["d"]
    if "spread" in spec:
        centres = rng.standard_normal((len(sizes), d))
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        labels = rng.permutation(np.repeat(np.arange(len(sizes)), sizes)).astype(np.int64)
        x = centres[labels] + spec["spread"] * rng.standard_normal((n, d)) / np.sqrt(d)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x.astype(np.float32), labels, True
    x = rng.standard_normal((n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    normalized = "norms" not in spec
    if not normalized:
        lo, hi = spec["norms"]
        x *= rng.uniform(lo, hi, size=(n, 1))
    labels = rng.permutation(np.repeat(np.arange(len(sizes)), sizes)).astype(np.int64)
    return x.astype(np.float32), labels, normalized


def kmeans_groups(x, labels, n_cluster, beta=0.5, iters=10):
    """Deterministic Lloyd k-means on [x, beta * onehot(y)], started from the first rows."""
    classes = np.unique(labels)
    onehot = (labels[:, None] == classes[None, :]).astype(np.float64)
    z = np.concatenate([x.astype(np.float64), beta * onehot], 1)
    centres = z[:n_cluster].copy()
    assign = np.zeros(len(z), dtype=np.int64)
    for _ in range(iters):
        d2 = ((z[:, None, :] - centres[None, :, :]) ** 2).sum(2)
        assign = np.argmin(d2, 1).astype(np.int64)  # ties: lowest cluster
        for c in range(n_cluster):
            members = assign == c
            if members.any():  # an empty cluster keeps its centre
                centres[c] = z[members].mean(0)
    return assign


def case_params(n, d):
    """Per-batch parameter overrides, following the golden cases' rules."""
    k = min(16, n // 2)
    half = [0, d // 2, d]
    return {
        "bin_branch": {"slices": [0, d // 3, (2 * d) // 3, d]},
        "branch_knn_softmax": {"k": k, "slices": half},
        "center_loss": {"an_margin": 1.0, "ap_margin": 0.5},
        "cluster_nca": {"alpha": 16.0, "beta": 0.5, "n_cluster": n // 4},
        "grad_nca": {"k": k},
        "histogram": {"num_steps": 51},
        "js_div_knn_softmax": {"k": k, "slices": half},
        "knn_softmax": {"k": k},
        "nca": {"k": k},
    }


def check_well_defined(x, y, params, groups):
    """Assert the batch keeps every loss away from empty means / out-of-range ranks."""
    n = len(y)
    x = x.astype(np.float64)
    counts = np.bincount(y)
    assert counts.min() >= 2 and len(counts) >= 2, "every anchor needs a positive and a negative"
    S = x @ x.T
    sq = (x * x).sum(1)
    Q = sq[:, None] + sq[None, :] - 2 * S
    D = np.sqrt(np.maximum(Q, 1e-12))
    same = y[:, None] == y[None, :]
    off = ~np.eye(n, dtype=bool)
    problems = []
    for i in range(n):
        pos, neg = S[i, same[i] & off[i]], S[i, ~same[i]]
        h_nonempty = (neg > pos.min() - 0.1).any()  # else the anchor is skipped anyway
        if h_nonempty and not (pos < neg.max() + 0.1).any():
            problems.append(f"hard_mining G empty at {i}")
    for name in ("knn_softmax", "nca", "grad_nca"):
        k = params[name]["k"]
        assert k < n - 1, f"{name}: k beyond the union"
        M = Q if name == "nca" else D
        for i in range(n):
            th = np.sort(M[i, off[i]])[k]
            if not (M[i, ~same[i]] < th).any():
                problems.append(f"{name}: KN empty at {i}")
    for name in ("branch_knn_softmax", "js_div_knn_softmax"):
        sl = params[name]["slices"]
        k = params[name]["k"]
        for b in range(len(sl) - 1):
            xb = x[:, sl[b]:sl[b + 1]]
            xb = xb / np.linalg.norm(xb, axis=1, keepdims=True)
            Db = np.sqrt(np.maximum(2 - 2 * xb @ xb.T, 1e-12))
            for i in range(n):
                th = np.sort(Db[i, off[i]])[k]
                if not (Db[i, ~same[i]] < th).any():
                    problems.append(f"{name}: KN empty at {i}, branch {b}")
    assert (same & off).sum() // 5 >= 1, "gaussian_metric keeps nothing"
    # cluster_nca: every row needs a same-label sub-cluster with Q > 1e-3
    keys = sorted(set(zip(groups.tolist(), y.tolist())))
    for i in range(n):
        ok = False
        for kg, ky in keys:
            if ky != y[i]:
                continue
            m = np.nonzero((groups == kg) & (y == ky))[0]
            c = x[m].mean(0)
            q = ((x[i] - c) ** 2).sum()
            if i in m and len(m) > 1:
                q *= len(m) ** 2 / (len(m) - 1) ** 2
            ok |= q > 1e-3
        if not ok:
            problems.append(f"cluster_nca: P empty at {i}")
    return problems


def write_case(out_root, spec):
    x32, labels, normalized = make_batch(spec)
    n, d = x32.shape
    x = x32.astype(np.float64)
    params = case_params(n, d)
    for name, extra in spec.get("extra", {}).items():
        params[name] = {**params.get(name, {}), **extra}
    groups = kmeans_groups(x, labels, params["cluster_nca"]["n_cluster"])
    problems = check_well_defined(x, labels, params, groups)
    if problems:
        raise SystemExit(f"{spec['case']}: not well defined: {problems[:5]}")
    folder = os.path.join(out_root, spec["case"])
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    os.makedirs(folder)
    np.save(os.path.join(folder, "x.npy"), x32)
    np.save(os.path.join(folder, "labels.npy"), labels)
    np.save(os.path.join(folder, "cluster_nca.groups.npy"), groups)
    manifest = {"case": spec["case"], "d": d, "n": n, "normalized": normalized, "seed": spec["seed"], "losses": {}}
    f32 = {"tolerance": F32_TOL, "losses": {}}
    for name in sorted(ref.LOSSES):
        p = params.get(name, {})
        inputs = {"groups": groups} if name == "cluster_nca" else {}
        loss, grad = ref.evaluate(name, x, labels, p, inputs, torch.float64)
        assert np.isfinite(loss) and np.isfinite(grad).all(), (spec["case"], name)
        assert loss != 0.0, f"{spec['case']}/{name}: loss is exactly 0"
        entry = {"grad": f"{name}.grad.npy", "loss": loss, "params": p}
        if inputs:
            entry["inputs"] = {"groups": "cluster_nca.groups.npy"}
        manifest["losses"][name] = entry
        np.save(os.path.join(folder, f"{name}.grad.npy"), grad.astype(np.float64))
        l32, g32 = ref.evaluate(name, x32, labels, p, inputs, torch.float32)
        loss_dev = abs(l32 - loss) / abs(loss)
        grad_dev = float(np.abs(g32 - grad).max() / max(np.abs(grad).max(), np.finfo(float).tiny))
        f32["losses"][name] = {
            "loss": l32,
            "loss_dev": loss_dev,
            "grad_dev": grad_dev,
            "f32_agrees": bool(loss_dev <= F32_TOL and grad_dev <= F32_TOL),
        }
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    with open(os.path.join(folder, "reference_f32.json"), "w") as f:
        json.dump(f32, f, indent=1, sort_keys=True)
    bad = [k for k, v in f32["losses"].items() if not v["f32_agrees"]]
    print(f"{spec['case']:16s} n={n:3d} d={d:3d} seed={spec['seed']} normalized={normalized} "
          f"classes={np.bincount(labels).tolist()} clusters={len(np.unique(groups))} "
          f"f32-unstable={bad}")


def main(argv):
    out_root = argv[0] if argv else DEFAULT_OUT
    os.makedirs(out_root, exist_ok=True)
    for spec in CASES:
        write_case(out_root, spec)


if __name__ == "__main__":
    main(sys.argv[1:])
