"""Type stubs of the compiled module ``sglp_engine._native`` (use the wrappers in ``sglp_engine``).

Arrays are passed as ``(name, address, shape, dtype)``: the address of a live, C-contiguous, native-endian
array of ``prod(shape)`` elements of ``dtype`` (``"f32"``, ``"f64"``, ``"f16"``, ``"bf16"``), which the caller
keeps alive and unchanged during the call. Results are the engine's JSON text.
"""

from typing import List, Optional, Sequence, Tuple

__version__: str

ArrayIn = Tuple[str, int, Sequence[int], str]

class Accumulator:
    def __init__(
        self,
        estimator: str,
        batch_size: int,
        kernel: str,
        rbf_threshold: float,
        route: str,
        device: str,
        threads: int,
        tokens: str,
        n_samples_hint: Optional[int] = None,
    ) -> None: ...
    @property
    def note(self) -> Optional[str]: ...
    @property
    def backend(self) -> str: ...
    @property
    def layers(self) -> List[str]: ...
    @property
    def cuda_device(self) -> Optional[int]: ...
    def update(self, arrays: Sequence[ArrayIn]) -> None: ...
    def update_device(self, arrays: Sequence[ArrayIn]) -> None: ...
    def finish(self) -> str: ...

def segment(
    layers: Sequence[str],
    matrix: Sequence[Sequence[float]],
    k: str,
    k_max: int,
    threshold: float,
    features: str,
    min_len: int,
) -> str: ...
def plan(
    cka_json: str,
    gradnorm: Sequence[float],
    remove: int,
    allocation: str,
    k: str,
    k_max: int,
    threshold: float,
    features: str,
    min_len: int,
) -> str: ...
def write_plan_report(report_json: str, out_dir: str) -> None: ...
def write_text(path: str, text: str) -> None: ...
