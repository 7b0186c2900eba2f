"""`miles convert`: HF <-> Megatron torch_dist checkpoints (and GGUF in), with MTP layers, verified.

The source format is detected: a HF directory (config.json + safetensors), a torch_dist
checkpoint (its DCP folder, or the root holding `latest_checkpointed_iteration.txt`) or a
`.gguf` file (dequantised into a cached HF directory first). The family's key map
(`checkpoint/mapping`) says which HF tensors make each megatron tensor.

What is streamed: HF -> torch_dist reads the HF tensors of one megatron tensor at a time
(safetensors random access), fuses them and hands the result to the DCP writer, which flushes a
file every `MAX_FILE_BYTES`. torch_dist -> HF reads one layer (or one expert) of one key at a
time and hands the split HF tensors to `save_hf_checkpoint`, which buffers one shard. Peak memory
is therefore about one output file or shard plus one tensor, not the model. The logits check of
`verify` is the exception: it builds the model twice (source and converted) in float32.

`verify` reads the written checkpoint back and compares it with the source tensor by tensor,
bitwise. For HF outputs it also runs the native model (`models/registry.py`) on the converted
directory and on the source (for a torch_dist source: the native model loaded with the source's
tensors) and compares the logits with `compare.compare_logits`; model types without a native
model skip this with a note. Everything is written to a temp sibling and renamed into place
only when conversion and verification succeeded.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from miles_core.checkpoint import mapping
from miles_core.checkpoint.compare import BitwiseReport, compare_logits
from miles_core.checkpoint.hf import HFTensors, iter_state_dict, read_hf_config, save_hf_checkpoint
from miles_core.checkpoint.loading import materialize
from miles_core.checkpoint.mapping.base import GLOBAL_MAP, TRANSFORMS, Plan
from miles_core.checkpoint.sources import resolve_model_source
from miles_core.checkpoint.torch_dist import (
    TRACKER, DistReader, DistWriter, extra_state_keys, find_checkpoint, megatron_common,
    parse_keys, slot_key, write_layout,
)
from miles_core.errors import MilesError, one_of
from miles_core.models.registry import MODEL_REGISTRY, build_model
from miles_core.utils.io import atomic_dir

FORMATS = ("hf", "torch_dist")
MAX_FILE_BYTES = 2**30
ProgressFn = Callable[[str, int, int], None]
"""on_progress(stage, done, total); stages are 'convert' and 'verify'."""


@dataclass
class ConvertReport:
    src: str
    dst: str
    src_format: str
    to: str
    model_type: str
    mtp_num_layers: int = 0
    num_tensors: int = 0
    num_bytes: int = 0
    seconds: float = 0.0
    bitwise: BitwiseReport | None = None
    logits: dict[str, float] | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["bitwise"] = None if self.bitwise is None else {
            "ok": self.bitwise.ok, "compared": self.bitwise.compared, "summary": self.bitwise.summary()}
        return out


def convert(src: str | Path, dst: str | Path, *, to: str, mtp_num_layers: int | None = None,
            model_type: str | None = None, verify: bool = False,
            on_progress: ProgressFn | None = None) -> ConvertReport:
    """Convert `src` into `dst` (which must not exist) in format `to`; see the module docstring."""
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if to not in FORMATS:
        raise one_of("output format", to, FORMATS)
    if mtp_num_layers is not None and mtp_num_layers < 0:
        raise MilesError(f"--mtp-num-layers must be >= 0, got {mtp_num_layers}")
    kind, source = _detect(src)
    _check_dst(src, dst)
    job = _Job(source, dst, verify, on_progress or (lambda stage, done, total: None))
    start = time.perf_counter()
    if kind == "torch_dist" and to == "hf":
        report = job.dist_to_hf(model_type, mtp_num_layers)
    elif kind != "torch_dist" and to == "torch_dist":
        report = job.hf_to_dist(_hf_dir(kind, source), model_type, mtp_num_layers)
    elif kind == "gguf":
        report = job.hf_to_hf(_hf_dir(kind, source), model_type, mtp_num_layers)
    else:
        raise MilesError(f"'{src}' is already a {'HF' if kind == 'hf' else 'torch_dist'} checkpoint")
    report.src, report.src_format, report.seconds = str(src), kind, time.perf_counter() - start
    return report


def _detect(src: Path) -> tuple[str, Path]:
    if src.is_file():
        if src.suffix == ".gguf":
            return "gguf", src
        raise MilesError(f"'{src}' is a file but not a .gguf; expected a HF directory, a torch_dist "
                         "checkpoint or a GGUF file")
    if not src.is_dir():
        raise MilesError(f"source '{src}' does not exist")
    if (src / "config.json").is_file():
        return "hf", src
    folder = find_checkpoint(src)
    if folder is None:
        raise MilesError(f"cannot tell the format of '{src}': no config.json (HF), no .metadata / "
                         f"metadata.json (torch_dist) and no {TRACKER} (torch_dist root)")
    return "torch_dist", folder


def _check_dst(src: Path, dst: Path) -> None:
    if dst.exists():
        raise MilesError(f"output '{dst}' already exists; remove it or choose another path")
    if dst.resolve().is_relative_to(src.resolve()):
        raise MilesError(f"output '{dst}' is inside the source '{src}'")


def _hf_dir(kind: str, path: Path) -> Path:
    """A GGUF file is dequantised once into a cached HF directory (`checkpoint/sources.py`)."""
    return resolve_model_source(str(path)) if kind == "gguf" else path


def _model_type(cfg: dict[str, Any], requested: str | None, where: Path) -> str:
    found = cfg.get("model_type")
    if requested is not None and found is not None and requested != found:
        raise MilesError(f"--model-type '{requested}' does not match model_type '{found}' of '{where}'")
    model_type = requested or found
    if model_type is None:
        raise MilesError(f"'{where}' does not say its model type; pass --model-type "
                         f"(one of: {', '.join(sorted(mapping.FAMILIES))})")
    mapping.family_for(model_type)
    return model_type


def _resolve_mtp(requested: int | None, available: int, where: Path) -> int:
    if requested is None:
        return available
    if requested > available:
        raise MilesError(f"--mtp-num-layers {requested} requested but '{where}' has MTP weights for "
                         f"{available} layer(s)")
    return requested


def _hf_mtp_layers(names: Iterable[str], num_layers: int) -> int:
    extra = {int(m[1]) for n in names if (m := re.match(r"model\.layers\.(\d+)\.", n)) and int(m[1]) >= num_layers}
    if extra != set(range(num_layers, num_layers + len(extra))):
        raise MilesError(f"layers beyond num_hidden_layers={num_layers} are not contiguous: {sorted(extra)}")
    return len(extra)


def _out_config(cfg: dict[str, Any], mtp: int) -> dict[str, Any]:
    out = dict(cfg)
    if mtp or "num_nextn_predict_layers" in out or out.get("model_type") == "deepseek_v3":
        out["num_nextn_predict_layers"] = mtp
    return out


@dataclass
class _Job:
    source: Path
    dst: Path
    verify: bool
    progress: ProgressFn

    def hf_to_dist(self, hf_dir: Path, model_type: str | None, mtp_req: int | None) -> ConvertReport:
        cfg = read_hf_config(hf_dir)
        family = mapping.family_for(_model_type(cfg, model_type, hf_dir))
        with HFTensors(hf_dir) as hf:
            mtp = _resolve_mtp(mtp_req, _hf_mtp_layers(hf.names, cfg["num_hidden_layers"]), hf_dir)
            plan = mapping.plan(family, cfg, mtp)
            _check_hf_names(hf, plan, cfg, hf_dir)
            args = {**family.megatron_args(cfg), "mtp_num_layers": mtp or None}
            report = ConvertReport("", str(self.dst), "", "torch_dist", cfg["model_type"], mtp)
            with atomic_dir(self.dst, overwrite=False) as tmp:
                folder = write_layout(tmp, None, megatron_common(args, _out_config(cfg, mtp), None))
                self._write_dist(folder, plan, hf, report)
                if self.verify:
                    report.bitwise = self._verify_dist(folder, plan, hf)
                    report.notes.append("logits: not run for torch_dist outputs (bitwise check only)")
        return report

    def _write_dist(self, folder: Path, plan: Plan, hf: HFTensors, report: ConvertReport) -> None:
        _check_shared_mtp(plan, hf)
        writer = DistWriter(folder, MAX_FILE_BYTES)
        for done, link in enumerate(plan.links, 1):
            parts = [hf.get(name) for name in link.hf_names]
            tensor = TRANSFORMS[link.transform].fuse(parts, plan.heads, link.hf_names)
            key, lead, offsets = slot_key(link.slot, plan)
            writer.add_tensor(key, lead + tuple(tensor.shape), offsets + (0,) * tensor.dim(),
                              tensor.reshape((1,) * len(lead) + tuple(tensor.shape)))
            report.num_tensors, report.num_bytes = done, report.num_bytes + tensor.nbytes
            self.progress("convert", done, len(plan.links))
        for key in extra_state_keys(plan):
            writer.add_object(key, None)
        writer.finish()

    def _verify_dist(self, folder: Path, plan: Plan, hf: HFTensors) -> BitwiseReport:
        reader = DistReader(folder)
        slots = _dist_slots(reader, plan)
        report = BitwiseReport()
        for done, link in enumerate(plan.links, 1):
            key, index = slots[link.slot]
            parts = TRANSFORMS[link.transform].split(reader.read(key, index), plan.heads, key)
            for name, part in zip(link.hf_names, parts):
                report.add(name, hf.get(name), part)
            self.progress("verify", done, len(plan.links))
        for name, slot in plan.shared:
            if name in hf.names:
                report.add(name, hf.get(name), reader.read(*slots[slot]))
        _raise_unless_ok(report)
        return report

    def dist_to_hf(self, model_type: str | None, mtp_req: int | None) -> ConvertReport:
        reader = DistReader(self.source)
        cfg, family = _dist_config(reader, model_type)
        raw, _ = parse_keys(reader.tensors)
        available = len({s.layer for s in raw if s.scope == "mtp"})
        mtp = _resolve_mtp(mtp_req, available, self.source)
        plan = mapping.plan(family, cfg, mtp)
        slots = _dist_slots(reader, plan)
        report = ConvertReport("", str(self.dst), "", "hf", cfg["model_type"], mtp)
        out_cfg = _out_config(cfg, mtp)
        with atomic_dir(self.dst, overwrite=False) as tmp:
            save_hf_checkpoint(tmp, self._counted(_export(reader, plan, slots), report), out_cfg)
            if self.verify:
                report.bitwise = self._verify_hf(tmp, plan, reader, slots)
                self._check_logits(report, out_cfg, tmp, lambda: _export(reader, plan, slots))
        return report

    def hf_to_hf(self, hf_dir: Path, model_type: str | None, mtp_req: int | None) -> ConvertReport:
        if mtp_req is not None:
            raise MilesError("--mtp-num-layers applies to conversions to or from torch_dist")
        cfg = read_hf_config(hf_dir)
        report = ConvertReport("", str(self.dst), "", "hf", _model_type(cfg, model_type, hf_dir))
        with atomic_dir(self.dst, overwrite=False) as tmp:
            save_hf_checkpoint(tmp, self._counted(iter_state_dict(hf_dir), report), cfg, source_dir=hf_dir)
            if self.verify:
                report.bitwise = BitwiseReport()
                with HFTensors(tmp) as out:
                    for name, tensor in iter_state_dict(hf_dir):
                        report.bitwise.add(name, tensor, out.get(name))
                _raise_unless_ok(report.bitwise)
                self._check_logits(report, cfg, tmp, lambda: iter_state_dict(hf_dir))
        return report

    def _counted(self, tensors: Iterable[tuple[str, torch.Tensor]], report: ConvertReport) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in tensors:
            report.num_tensors += 1
            report.num_bytes += tensor.nbytes
            self.progress("convert", report.num_tensors, 0)
            yield name, tensor

    def _verify_hf(self, out_dir: Path, plan: Plan, reader: DistReader, slots: dict) -> BitwiseReport:
        report = BitwiseReport()
        with HFTensors(out_dir) as out:
            expected = plan.hf_names()
            report.missing, report.unexpected = sorted(expected - out.names), sorted(out.names - expected)
            for done, link in enumerate(plan.links, 1):
                if not set(link.hf_names) <= out.names:
                    continue
                fused = TRANSFORMS[link.transform].fuse([out.get(n) for n in link.hf_names], plan.heads, link.hf_names)
                report.add(link.slot.describe(), reader.read(*slots[link.slot]), fused)
                self.progress("verify", done, len(plan.links))
            for name, slot in plan.shared:
                if name in out.names:
                    report.add(name, reader.read(*slots[slot]), out.get(name))
        _raise_unless_ok(report)
        return report

    def _check_logits(self, report: ConvertReport, cfg: dict[str, Any], out_dir: Path,
                      source_tensors: Callable[[], Iterable[tuple[str, torch.Tensor]]]) -> None:
        if cfg["model_type"] not in MODEL_REGISTRY:
            report.notes.append(f"logits: skipped, no native model for model_type '{cfg['model_type']}' yet")
            return
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, int(cfg["vocab_size"]), (2, 16), generator=generator)
        with HFTensors(out_dir) as out:
            converted = _logits(_native_model(cfg, ((n, out.get(n)) for n in sorted(out.names))), ids)
        source = _logits(_native_model(cfg, source_tensors()), ids)
        report.logits = compare_logits(source, converted)
        if not report.logits["bitwise"]:
            raise MilesError(f"verification failed: converted logits differ from the source's "
                             f"(max abs {report.logits['max_abs']:.3g}, kl {report.logits['kl']:.3g})")


def _check_hf_names(hf: HFTensors, plan: Plan, cfg: dict[str, Any], where: Path) -> None:
    expected = {n for link in plan.links for n in link.hf_names}
    missing = sorted(expected - hf.names)
    beyond = re.compile(r"model\.layers\.(\d+)\.")
    ignored = {n for n in hf.names if (m := beyond.match(n)) and int(m[1]) >= plan.num_layers + plan.mtp_num_layers}
    unexpected = sorted(hf.names - expected - plan.dropped - ignored)
    if missing or unexpected:
        raise MilesError(f"'{where}' does not match model_type '{cfg['model_type']}': "
                         f"missing {_first(missing)}, unexpected {_first(unexpected)}")
    embedding = hf.shape("model.embed_tokens.weight")
    if embedding != (cfg["vocab_size"], cfg["hidden_size"]):
        raise MilesError(f"shape mismatch for 'model.embed_tokens.weight': the config implies "
                         f"{(cfg['vocab_size'], cfg['hidden_size'])}, the checkpoint has {embedding}")


def _dist_config(reader: DistReader, model_type: str | None) -> tuple[dict[str, Any], mapping.Family]:
    """The HF config stored with the checkpoint, else one rebuilt from megatron's arguments."""
    common = reader.common()
    cfg = common.get("hf_config") if isinstance(common.get("hf_config"), dict) else None
    if cfg is not None:
        return cfg, mapping.family_for(_model_type(cfg, model_type, reader.folder))
    args = common.get("args")
    args = vars(args) if hasattr(args, "__dict__") and not isinstance(args, dict) else args
    if not isinstance(args, dict):
        raise MilesError(f"'{reader.folder}' has neither a HF config nor megatron arguments in common.pt")
    model_type = _model_type({}, model_type, reader.folder)
    return mapping.family_for(model_type).hf_config(args, model_type), mapping.family_for(model_type)


def _dist_slots(reader: DistReader, plan: Plan) -> dict[mapping.Slot, tuple[str, tuple[int, ...]]]:
    """Where each planned slot lives in the checkpoint; anything missing or extra is an error."""
    raw, odd = parse_keys(reader.tensors)
    found = {plan.canonical(slot): where for slot, where in raw.items()
             if slot.scope != "mtp" or slot.layer < plan.mtp_num_layers}
    expected = {link.slot for link in plan.links}
    missing = sorted(s.describe() for s in expected - found.keys())
    unexpected = sorted(s.describe() for s in found.keys() - expected) + odd
    if missing or unexpected:
        raise MilesError(f"torch_dist checkpoint '{reader.folder}' does not match the model: "
                         f"missing {_first(missing)}, unexpected {_first(unexpected)}")
    return found


def _export(reader: DistReader, plan: Plan, slots: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """The HF tensors of a torch_dist checkpoint, one megatron tensor read at a time."""
    for link in plan.links:
        key, index = slots[link.slot]
        yield from zip(link.hf_names, TRANSFORMS[link.transform].split(reader.read(key, index), plan.heads, key))
    for name, slot in plan.shared:
        yield name, reader.read(*slots[slot])


def _check_shared_mtp(plan: Plan, hf: HFTensors) -> None:
    """Megatron's MTP layers share the main embedding and output layer, so an HF checkpoint whose
    MTP copies differ from them cannot be represented: refuse rather than drop the difference."""
    main = {mcore: name for name, mcore in GLOBAL_MAP.keys.items()}
    for name, slot in plan.shared:
        if name not in hf.names:
            continue
        source = main[slot.name] if main[slot.name] in hf.names else "model.embed_tokens.weight"
        if not torch.equal(hf.get(name), hf.get(source)):
            raise MilesError(f"'{name}' differs from '{source}': Megatron's MTP layers share the main model's "
                             "embedding and output layer, so this checkpoint cannot be converted to torch_dist "
                             "as is (convert with --mtp-num-layers 0 to drop the MTP layers)")


def _raise_unless_ok(report: BitwiseReport) -> None:
    if not report.ok:
        raise MilesError(f"verification failed: {report.summary()}")


def _native_model(cfg: dict[str, Any], tensors: Iterable[tuple[str, torch.Tensor]]) -> nn.Module:
    """The native float32 model of `cfg` holding `tensors` (names it lacks, e.g. MTP, are skipped)."""
    with torch.device("meta"):
        model = build_model(cfg)
    model = materialize(model, torch.device("cpu"), torch.float32)
    targets = model.state_dict(keep_vars=True)
    loaded = set()
    for name, tensor in tensors:
        if name in targets:
            targets[name].data = tensor.to(torch.float32)
            loaded.add(id(targets[name]))
    missing = [name for name, target in targets.items() if id(target) not in loaded]
    if missing:
        raise MilesError(f"the converted checkpoint lacks tensors the model needs: {_first(missing)}")
    return model.eval()


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        return model.lm_head(model(ids, positions)).float()


def _first(names: list[str], limit: int = 5) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"[{', '.join(names[:limit]) or 'none'}{more}]"
