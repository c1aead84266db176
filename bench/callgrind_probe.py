"""One call of a fastsel CPU op after a warm-up, single-threaded, for instruction counts
under callgrind (repeatable, unlike the wall clock on a shared VM). Used to compare two
builds, e.g. (valgrind has no AVX-512, so compare the AVX2 code paths):

    OMP_NUM_THREADS=1 FASTSEL_CPU_ISA=avx2 PYTHONPATH=<checkout> valgrind --tool=callgrind \
        --collect-atstart=no --toggle-collect='fastsel::cpu::dispatch::select_topk*' \
        python bench/callgrind_probe.py topk

(the toggle names the op's outermost C++ function in that build). Ops: score, score_mms,
backward, topk, sample.
"""
import sys
sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]
import torch, fastsel
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
op = sys.argv[1]
if op == "score":
    x = torch.randn(4096, 1000, generator=g); t = torch.randint(0, 1000, (4096,), generator=g)
    f = lambda: fastsel.score(x, t, backend="cpu")
elif op == "score_mms":
    x = torch.randn(4096, 1000, generator=g); t = torch.randint(0, 1000, (4096,), generator=g)
    w = torch.randn(1000, 64, generator=g)
    f = lambda: fastsel.score(x, t, **({"head": w} if "head" in fastsel.score.__code__.co_varnames else {"weight": w}), backend="cpu")
elif op == "backward":
    x = torch.randn(4096, 1000, generator=g).requires_grad_(True); t = torch.randint(0, 1000, (4096,), generator=g)
    f = lambda: torch.autograd.grad(fastsel.score(x, t, backend="cpu").loss.sum(), x)
elif op == "topk":
    s = torch.rand(1 << 18, generator=g)
    f = lambda: fastsel.select_topk(s, 1 << 14, backend="cpu")
elif op == "sample":
    s = torch.rand(1 << 18, generator=g)
    f = lambda: fastsel.sample(s, 1 << 14, seed=1, counter=2, backend="cpu")
f()  # warm-up (allocations, first-call paths)
def measured():
    return f()
measured()
print(fastsel.build_info()["isa"])
