"""Check the PyTorch reference (losses.py) against the golden cases.

Usage: python3 tools/reference/check_golden.py [GOLDEN_DIR] [--float32]

For every case and loss: relative loss error |ref - golden| / |golden| and gradient error
max|ref - golden| / max|golden|. Prints a per-loss table of the worst errors over the cases
and exits non-zero unless every loss is within 1e-12 (loss) and 1e-10 (gradient).
With --float32 the reference runs in float32 instead and is held to the golden README's
float32 tolerances, 1e-4 and 1e-4.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import losses as ref  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT = os.path.normpath(os.path.join(HERE, "..", "..", "tests", "data", "golden"))
LOSS_TOL, GRAD_TOL = 1e-12, 1e-10


def load_case(folder):
    x = np.load(os.path.join(folder, "x.npy")).astype(np.float64)
    labels = np.load(os.path.join(folder, "labels.npy"))
    with open(os.path.join(folder, "manifest.json")) as f:
        manifest = json.load(f)
    return x, labels, manifest


def case_inputs(folder, entry):
    return {k: np.load(os.path.join(folder, v)) for k, v in (entry.get("inputs") or {}).items()}


def errors(folder, x, labels, name, entry, dtype=torch.float64):
    loss, grad = ref.evaluate(name, x, labels, entry.get("params"), case_inputs(folder, entry), dtype)
    exp_loss = entry["loss"]
    exp_grad = np.load(os.path.join(folder, entry["grad"]))
    le = abs(loss - exp_loss) / max(abs(exp_loss), np.finfo(float).tiny)
    ge = np.abs(grad - exp_grad).max() / max(np.abs(exp_grad).max(), np.finfo(float).tiny)
    return le, ge, loss, exp_loss


def main(argv):
    args = [a for a in argv if not a.startswith("--")]
    f32 = "--float32" in argv
    dtype = torch.float32 if f32 else torch.float64
    loss_tol, grad_tol = (1e-4, 1e-4) if f32 else (LOSS_TOL, GRAD_TOL)
    root = args[0] if args else DEFAULT
    cases = sorted(c for c in os.listdir(root) if os.path.isdir(os.path.join(root, c)))
    worst = {}
    for case in cases:
        folder = os.path.join(root, case)
        x, labels, manifest = load_case(folder)
        for name, entry in manifest["losses"].items():
            le, ge, loss, exp_loss = errors(folder, x, labels, name, entry, dtype)
            w = worst.setdefault(name, [0.0, "", 0.0, ""])
            if le >= w[0]:
                w[0], w[1] = le, case
            if ge >= w[2]:
                w[2], w[3] = ge, case
    bad = 0
    print(f"{'loss':22s} {'worst rel loss err':>20s} {'(case)':12s} {'worst grad err':>16s} {'(case)':12s}")
    for name in sorted(worst):
        le, lc, ge, gc = worst[name]
        flag = "" if (le <= loss_tol and ge <= grad_tol) else "  FAIL"
        bad += bool(flag)
        print(f"{name:22s} {le:20.2e} {lc:12s} {ge:16.2e} {gc:12s}{flag}")
    print(f"{len(worst)} losses x {len(cases)} cases ({dtype}); {bad} losses outside {loss_tol:g} / {grad_tol:g}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
