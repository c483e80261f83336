"""A saved basis with each of its fields corrupted (dtypes, shapes, metadata values, block
offsets, NaN and Inf): every case either loads and computes exactly what the intact basis
computes, or raises a named error. The kernels take raw pointers, so the cases run in a
subprocess: a crash shows as its exit code, not ours. (Other code values in the right
layout are a valid basis, not a corruption that can be seen.)"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    r"""
    import io, os, sys
    import torch
    import twa_kernels as tk

    torch.manual_seed(0)
    qb = tk.quantize(torch.randn(3, 1000), bits=4, group_size=64, block_sizes=[100, 400, 500])
    buf = io.BytesIO()
    torch.save(qb.state_dict(), buf)
    saved = buf.getvalue()
    g, x, center = torch.randn(1000), torch.randn(3, 3), torch.randn(1000)
    want = (tk.project(qb, g), tk.reconstruct(qb, x, center))

    def edit(key, fn):
        def corrupt(state):
            state[key] = fn(state[key])
        return corrupt

    def setitem(key, index, value):
        def fn(t):
            t = t.clone()
            t[index] = value
            return t
        return edit(key, fn)

    def meta(i, value):
        return setitem("meta", i, value)

    def drop(key):
        return lambda state: state.pop(key)

    nan, inf = float("nan"), float("inf")
    CASES = {
        "codes int8": edit("codes", lambda t: t.to(torch.int8)),
        "codes int16": edit("codes", lambda t: t.to(torch.int16)),
        "codes float32": edit("codes", lambda t: t.float()),
        "codes one row fewer": edit("codes", lambda t: t[:-1]),
        "codes one column fewer": edit("codes", lambda t: t[:, :-1]),
        "codes one column more": edit("codes", lambda t: torch.cat([t, t[:, :1]], 1)),
        "codes 1-D": edit("codes", lambda t: t.reshape(-1)),
        "codes 3-D": edit("codes", lambda t: t[None]),
        "codes empty": edit("codes", lambda t: t[:0]),
        "codes transposed (non-contiguous)": edit("codes", lambda t: t.T.contiguous().T),
        "scales nan": setitem("scales", (2, 1), nan),
        "scales inf": setitem("scales", (0, 0), inf),
        "scales -inf": setitem("scales", (0, 2), -inf),
        "scales negative": setitem("scales", (1, 1), -1.0),
        "scales float64": edit("scales", lambda t: t.double()),
        "scales float16": edit("scales", lambda t: t.half()),
        "scales transposed": edit("scales", lambda t: t.T.contiguous()),
        "scales one group fewer": edit("scales", lambda t: t[:-1]),
        "scales 1-D": edit("scales", lambda t: t.reshape(-1)),
        "mins nan": setitem("mins", (3, 0), nan),
        "mins inf": setitem("mins", (0, 1), inf),
        "mins float64": edit("mins", lambda t: t.double()),
        "mins one group more": edit("mins", lambda t: torch.cat([t, t[:1]])),
        "offsets last + 1": setitem("block_offsets", -1, 1001),
        "offsets last - 1": setitem("block_offsets", -1, 999),
        "offsets first 1": setitem("block_offsets", 0, 1),
        "offsets negative": setitem("block_offsets", 1, -5),
        "offsets not increasing": setitem("block_offsets", 2, 50),
        "offsets empty block": setitem("block_offsets", 2, 100),
        "offsets huge": setitem("block_offsets", 1, 2**40),
        "offsets float": edit("block_offsets", lambda t: t.double()),
        "offsets int32": edit("block_offsets", lambda t: t.to(torch.int32)),
        "offsets 2-D": edit("block_offsets", lambda t: t[None]),
        "offsets one entry": edit("block_offsets", lambda t: t[:1]),
        "meta bits 3": meta(0, 3),
        "meta bits 8": meta(0, 8),
        "meta bits 0 (dense)": meta(0, 0),
        "meta bits -4": meta(0, -4),
        "meta group_size 0": meta(1, 0),
        "meta group_size -64": meta(1, -64),
        "meta group_size 12": meta(1, 12),
        "meta group_size 128": meta(1, 128),
        "meta group_size huge": meta(1, 2**40),
        "meta num_cols + 1": meta(2, 1001),
        "meta num_cols 0": meta(2, 0),
        "meta num_cols huge": meta(2, 2**40),
        "meta float": edit("meta", lambda t: t.double()),
        "meta 2 entries": edit("meta", lambda t: t[:2]),
        "missing codes": drop("codes"),
        "missing meta": drop("meta"),
        "not a tensor": edit("scales", lambda t: t.tolist()),
    }
    for name, corrupt in CASES.items():
        print("case", name, end=": ", flush=True)
        state = torch.load(io.BytesIO(saved), weights_only=True)
        corrupt(state)
        try:
            loaded = tk.QuantizedBasis.from_state_dict(state)
            got = (tk.project(loaded, g), tk.reconstruct(loaded, x, center))
        except (KeyError, ValueError, TypeError) as exc:
            print("refused", type(exc).__name__, str(exc).splitlines()[0][:100], flush=True)
            continue
        same = all(torch.equal(a, b) for a, b in zip(got, want))
        print("same" if same else "DIFFERENT", flush=True)
    print("done", len(CASES))
    """
)


def test_every_corruption_of_a_saved_basis_is_refused_or_harmless():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TWA_KERNELS_BACKEND": "cpp"})
    print(result.stdout)
    assert result.returncode == 0, f"the process crashed or failed (exit {result.returncode}):\n" \
                                   f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    lines = [line for line in result.stdout.splitlines() if line.startswith("case ")]
    n_cases = int(result.stdout.split("done ")[-1])
    assert len(lines) == n_cases >= 30
    assert not [line for line in lines if "DIFFERENT" in line]
    refused = [line for line in lines if "refused" in line]
    assert len(refused) == n_cases - 2, lines  # all but the harmless int32 offsets and strided codes


FUZZ = textwrap.dedent(
    r"""
    import os, random, sys
    import torch
    from torch import nn
    import twa_kernels as tk
    from twa_kernels.errors import TWAKernelsError
    from twa_kernels.quant import QuantizedBasis

    rng = random.Random(int(sys.argv[2]))
    torch.manual_seed(int(sys.argv[2]))

    def on_reference(fn):
        os.environ["TWA_KERNELS_BACKEND"] = "reference"
        try:
            return fn()
        finally:
            del os.environ["TWA_KERNELS_BACKEND"]

    def offsets_for(d):
        mode = rng.random()
        if mode < 0.6:  # a valid partition
            cuts = sorted(rng.sample(range(1, d), min(d - 1, rng.randint(0, 4)))) if d > 1 else []
            return torch.tensor([0, *cuts, d])
        if mode < 0.8:  # random values, sometimes sorted
            values = [rng.randint(-5, d + 5) for _ in range(rng.randint(1, 5))]
            return torch.tensor(sorted(values) if rng.random() < 0.5 else values)
        if mode < 0.86:
            return torch.tensor([0, rng.choice([2**31, 2**40, -(2**40)]), d])
        if mode < 0.93:
            return torch.tensor([0, d]).to(rng.choice([torch.int32, torch.float64, torch.uint8]))
        return torch.tensor([[0, d]])

    def perturbed(t):
        kind = rng.randrange(6)
        if kind == 0 and t.dim() == 2 and t.shape[1] > 1:
            return t[:, :-1]
        if kind == 1 and t.shape[0] > 1:
            return t[:-1]
        if kind == 2:
            return torch.cat([t, t[:1]])
        if kind == 3:
            return t.to(rng.choice([torch.int8, torch.float64, torch.float16, torch.int32]))
        if kind == 4:
            return t.reshape(-1)
        return t.to("meta")

    class Flat(nn.Module):
        def __init__(self, shapes):
            super().__init__()
            self.p = nn.ParameterList([nn.Parameter(torch.zeros(s)) for s in shapes])

        def forward(self, x):
            return (torch.cat([p.reshape(-1) for p in self.p]) * x).sum()  # its gradient is x

    ran = refused = 0
    for case in range(int(sys.argv[1])):
        k, d = rng.randint(1, 4), rng.randint(1, 300)
        bits = rng.choice([None, 1, 2, 4, 8] * 3 + [3, 0, 4.0])
        group_size = rng.choice([8, 16, 24, 64, 128] * 3 + [0, 7, -8])
        good_bits = bits if bits in (None, 1, 2, 4, 8) and not isinstance(bits, float) else 4
        good_group = group_size if group_size > 0 and group_size % 8 == 0 else 8
        base = tk.quantize(torch.randn(k, d), bits=good_bits, group_size=good_group)
        fields = dict(codes=base.codes, scales=base.scales, mins=base.mins, block_offsets=offsets_for(d),
                      bits=bits, group_size=group_size, num_cols=d if rng.random() < 0.9 else d + rng.choice([-1, 1]))
        for name in ("codes", "scales", "mins"):
            if rng.random() < 0.08:
                fields[name] = perturbed(fields[name])
        as_twa = rng.random() < 0.25
        try:
            qb = QuantizedBasis(**fields)
            g, x, center = torch.randn(d), torch.randn(qb.k, qb.num_blocks), torch.randn(d)
            if as_twa:
                cut = rng.randint(1, d - 1) if d > 1 else d
                shapes = [(cut,), (d - cut,)] if cut < d else [(d,)]
                sub = tk.Subspace([f"p.{i}" for i in range(len(shapes))], shapes, center, qb)
                twa = tk.TWA(Flat(shapes), sub)
                with torch.no_grad():
                    twa.coefficients.copy_(x)
                got = [torch.cat([w.reshape(-1) for w in twa.weights().values()])]
                want = [on_reference(lambda: tk.reconstruct(qb, x, center))]
                loss = twa(g)
                loss.backward()
                got.append(twa.coefficients.grad)
                want.append(on_reference(lambda: tk.project(qb, g)))
            else:
                got = [tk.project(qb, g), tk.reconstruct(qb, x, center)]
                want = on_reference(lambda: [tk.project(qb, g), tk.reconstruct(qb, x, center)])
        except TWAKernelsError:
            refused += 1
            continue
        except Exception as exc:
            print(f"UNNAMED case {case}: {type(exc).__name__}: {exc}"[:300], flush=True)
            continue
        for a, b in zip(got, want):
            tol = 1e-4 * (1 + float(b.abs().max()))
            if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=tol):
                print(f"DIFFERENT case {case}: {fields['bits']} {fields['group_size']} {fields['block_offsets']}",
                      flush=True)
        ran += 1
    print("ran", ran, "refused", refused)
    """
)


def test_two_thousand_hand_built_bases_run_right_or_are_refused_by_name():
    """QuantizedBasis and Subspace objects built directly with random offsets, shapes,
    dtypes, devices and metadata: no case crashes the process, each either matches the
    reference backend (through the ops, and through TWA's forward and backward) or raises
    a library error."""
    env = {k: v for k, v in os.environ.items() if k != "TWA_KERNELS_BACKEND"}
    result = subprocess.run([sys.executable, "-c", FUZZ, "2000", "20"], capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, f"exit {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    problems = [line for line in result.stdout.splitlines() if line.startswith(("UNNAMED", "DIFFERENT"))]
    assert not problems, "\n".join(problems[:20])
    counts = result.stdout.split()
    ran, refused = int(counts[counts.index("ran") + 1]), int(counts[counts.index("refused") + 1])
    assert ran + refused == 2000 and ran >= 400 and refused >= 400, (ran, refused)
