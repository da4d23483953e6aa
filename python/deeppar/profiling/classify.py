"""Which GPU activities are communication: an ordered, extensible table of rules.

The first rule whose pattern matches (``re.search``) a name decides. Rules that name local
work inside communication libraries (DeepEP's dispatch-layout kernel, casts) come before the
broad communication rules so that they win. Users prepend their own rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

COMM, COMPUTE, MEMORY = "communication", "computation", "memory"
CLASSES = (COMPUTE, COMM, MEMORY)  # index = class code used in arrays
CLASS_CODE = {c: i for i, c in enumerate(CLASSES)}


@dataclass(frozen=True)
class Rule:
    """One row of the table: activities of ``kind`` whose name matches ``pattern``."""

    name: str
    pattern: str
    category: str  # COMM, COMPUTE or MEMORY
    kind: str = "kernel"  # "kernel", "memcpy", "memset" or "any"

    def __post_init__(self) -> None:
        if self.category not in CLASSES:
            raise ValueError(f"rule {self.name!r}: category must be one of {CLASSES}, "
                             f"got {self.category!r}")
        if self.kind not in ("kernel", "memcpy", "memset", "any"):
            raise ValueError(f"rule {self.name!r}: kind must be kernel, memcpy, memset or any, "
                             f"got {self.kind!r}")
        try:
            re.compile(self.pattern)
        except re.error as exc:
            raise ValueError(f"rule {self.name!r}: invalid regex {self.pattern!r}: {exc}") from None


DEFAULT_RULES: tuple[Rule, ...] = (
    # local work inside communication libraries
    Rule("deepep-layout", r"get_dispatch_layout", COMPUTE),
    # DeepEP (and DeepSeek's internal EP library): intranode/internode/low-latency kernels
    Rule("deepep", r"\b(deep_ep|dpsk::ep)::(intranode|internode|internode_ll|ll)::\w*"
                   r"(dispatch|combine|notify|barrier)", COMM),
    # NCCL: old names (ncclKernel_AllReduce_..., ncclAllReduceRingLLKernel_...) and new
    # (ncclDevKernel_AllReduce_Sum_f32_RING_LL, ncclDevKernel_SendRecv, ncclDevKernel_Generic)
    Rule("nccl", r"\bnccl\w*(Kernel|DevKernel)|^nccl", COMM),
    Rule("rccl/msccl", r"(?i)\b(rccl|msccl)", COMM),
    Rule("nvshmem", r"(?i)nvshmem", COMM),
    Rule("gloo", r"(?i)\bgloo", COMM),
    Rule("symmetric-memory", r"symmetric_memory|c10d::symm", COMM),
    # vLLM's custom all-reduce (vllm::cross_device_reduce_1stage / _2stage)
    Rule("vllm-custom-allreduce", r"cross_device_reduce_\d?stage", COMM),
    # TransformerEngine's userbuffers (comm-GEMM overlap): userbuffers_*, kuserbuffers_*
    Rule("userbuffers", r"(?i)userbuffers", COMM),
    # compiler-generated kernels (Inductor's triton_poi_fused__to_copy_all_gather_0, nvFuser,
    # TVM/XLA fusions) are local work, even when named after the collective they feed
    Rule("generated-kernel", r"^(?:void\s+)?(?:triton_|nvfuser_|fused_)|CudaCodeGen::kernel",
         COMPUTE),
    # casts are local even when named after a transfer (not "broadcast")
    Rule("cast", r"(?i)(?<![a-z])cast", COMPUTE),
    Rule("collective-name", r"(?i)all_?to_?all|all_?gather|reduce_?scatter|all_?reduce"
                            r"|\bsend_?recv|\bp2p", COMM),
    # memory traffic: peer-to-peer copies move data between devices; the rest is local
    Rule("memcpy-p2p", r"PtoP|Peer", COMM, kind="memcpy"),
    Rule("memcpy", r"", MEMORY, kind="memcpy"),
    Rule("memset", r"", MEMORY, kind="memset"),
)


@dataclass
class Classifier:
    """Ordered rules; ``extra`` rules are tried before the defaults."""

    rules: list[Rule] = field(default_factory=lambda: list(DEFAULT_RULES))

    def __post_init__(self) -> None:
        self._compiled = [(r, re.compile(r.pattern)) for r in self.rules]
        self._cache: dict[tuple[str, str], tuple[str, str]] = {}

    @classmethod
    def with_patterns(cls, comm: list[str] | tuple[str, ...] = (),
                      compute: list[str] | tuple[str, ...] = ()) -> Classifier:
        """Defaults plus user regexes (tried first) for communication and computation."""
        extra = [Rule(f"user-comm:{p}", p, COMM, kind="any") for p in comm]
        extra += [Rule(f"user-compute:{p}", p, COMPUTE, kind="any") for p in compute]
        return cls(extra + list(DEFAULT_RULES))

    def classify(self, name: str, kind: str = "kernel") -> tuple[str, str]:
        """(category, rule name) for an activity name; unmatched kernels are computation."""
        key = (name, kind)
        hit = self._cache.get(key)
        if hit is None:
            hit = (COMPUTE if kind == "kernel" else MEMORY, "default")
            for rule, rx in self._compiled:
                if (rule.kind == "any" or rule.kind == kind) and rx.search(name):
                    hit = (rule.category, rule.name)
                    break
            self._cache[key] = hit
        return hit


_TEMPLATE_OR_ARGS = re.compile(r"[<(]")


def kernel_family(name: str) -> str:
    """A short family name: the qualified function name without return type, template
    arguments and parameters (``void ns::k<128>(int*)`` -> ``ns::k``)."""
    s = name.strip().replace("(anonymous namespace)", "(anon)")
    if s.startswith("void "):
        s = s[5:]
    for m in _TEMPLATE_OR_ARGS.finditer(s):
        if s.startswith("(anon)", m.start()):
            continue
        s = s[: m.start()]
        break
    s = s.strip()
    if s.endswith("device_kernel") and name.count("<"):  # cutlass wrapper: name the kernel
        inner = name[name.index("<", name.index("device_kernel")) + 1:]
        s = f"{s}<{kernel_family(inner.split('::Params')[0]).rstrip('>')}>"
    if len(s) > 80:
        s = s[:77] + "..."
    return s or name[:80]
