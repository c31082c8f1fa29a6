"""`flora export`: merge, export each part, validate, derive fp16/int8, score, and install the directory.

Everything is written into a staging folder inside the output directory and moved into place
only once every fp32 and fp16 file has passed validation, the manifest last; an export that
fails validation leaves the output directory as it was. A quantized file whose top-1 agreement
with fp32 falls below the threshold is still written (to be inspected) but marked as not passed
in the manifest and the result, and `ok` is False: the report says so rather than claiming success.

int8 is accuracy-aware by default (`int8_scheme="auto"`): the schemes of export.quantize.INT8_SCHEMES
are tried fastest first and the first that meets the agreement threshold is kept; every attempt is
reported, so the speed given up for agreement is visible.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export import evaluate
from export.inputs import random_inputs, real_inputs, synthetic_images, trace_sample
from export.manifest import MANIFEST_FILE, Manifest
from export.merge import MERGE_BASES, compare_merge_bases, merge_adapter
from export.metadata import export_metadata
from export.onnx_export import compare_outputs, export_part, onnx_outputs, raise_unless_ok, summarize, torch_outputs
from export.parts import PARTS, PRECISIONS, OnnxPart, get_part, parse_list
from export.providers import make_session
from export.quality import accuracy, median_latency_ms
from export.quantize import INT8_SCHEMES, check_int8_mode, make_precision
from export.records import ExportRecord, ExportResult
from export.zero_shot import HEAD_FILE
from flora import __version__
from flora.data.datasets import LabeledImages
from flora.errors import ConfigError
from flora.modeling import scoring
from flora.modeling.loading import LoadedClip
from flora.modeling.training_info import TrainingInfo, resolve_prompt_template

log = logging.getLogger(__name__)

FP32_MIN_COSINE = 0.9999
FP16_MIN_COSINE = 0.999


@dataclass(frozen=True)
class Limits:
    tolerance: float = 1e-4  # fp32: max abs difference of every output from PyTorch
    fp16_tolerance: float = 1e-2  # fp16: on embeddings; on logits it is multiplied by the logit scale
    agreement_threshold: float = 0.99  # fp16/int8: top-1 agreement with fp32 on the scoring set
    latency_repeats: int = 10
    int8_scheme: str = "auto"  # a name from export.quantize.INT8_SCHEMES, or auto: the fastest that agrees

    def __post_init__(self):
        check_int8_mode(self.int8_scheme)
        if not self.tolerance > 0 or not self.fp16_tolerance > 0:
            raise ConfigError("tolerances must be positive numbers")
        if not 0.0 <= self.agreement_threshold <= 1.0:
            raise ConfigError(f"agreement threshold must be between 0 and 1, got {self.agreement_threshold}")


def export_and_validate(
    base: str,
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    eval_data: LabeledImages | None = None,
    prompt_template: str | None = None,
    tolerance: float = 1e-4,
    parts: Sequence[str] | str = ("model",),
    precisions: Sequence[str] | str = ("fp32",),
    merge_base: str = "original",
    labels: Sequence[str] | None = None,
    agreement_threshold: float = 0.99,
    fp16_tolerance: float = 1e-2,
    latency_repeats: int = 10,
    int8_scheme: str = "auto",
) -> ExportResult:
    """Export the merged model; raise ExportValidationError if an fp32 or fp16 file disagrees with PyTorch.

    int8 has no elementwise bound (dynamic quantization moves values by design): it is judged, as
    fp16 is too, by top-1 agreement with fp32 on `eval_data` (else on synthetic images).

    `prompt_template` and the zero-shot head's labels default to what the adapter was trained with
    (its flora_training.json), else the default template and the eval data's classes.
    """
    limits = Limits(tolerance, fp16_tolerance, agreement_threshold, latency_repeats, int8_scheme)
    parts = parse_list(parts, tuple(PARTS), "parts")
    # fp32 is always written: it is the file the others are derived from and validated against.
    precisions = ("fp32", *(p for p in parse_list(precisions, PRECISIONS, "precisions") if p != "fp32"))
    if merge_base not in MERGE_BASES:
        raise ConfigError(f"merge base must be one of {', '.join(MERGE_BASES)}, got {merge_base!r}")
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)

    training = TrainingInfo.read(adapter_dir)
    prompt_template = resolve_prompt_template(prompt_template, training, scoring.DEFAULT_TEMPLATE, what="export")
    _warn_about_untrained_classes(eval_data, training)
    clip = merge_adapter(base, adapter_dir, merge_base="original")
    trained_names = training.class_names if training is not None else None
    head_labels = evaluate.labels_for(labels, eval_data.class_names if eval_data else trained_names)
    data = _scoring_set(eval_data, head_labels, prompt_template)
    # Validation uses other batch sizes and sequence lengths than the trace (dynamic axes).
    checks = {
        "random": random_inputs(clip),
        "real": real_inputs(clip, data.prompts[:3], data.images[4:9] or data.images[:5]),
    }
    merge_report = {"used": "original"}
    if merge_base != "original":
        merge_report, merged = compare_merge_bases(base, adapter_dir, checks["real"], original=clip)
        merge_report["used"] = merge_report["closer"] if merge_base == "auto" else merge_base
        clip = merged[merge_report["used"]]
    metadata = export_metadata(base, adapter_dir, merge_base=merge_report["used"])

    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-staging-", dir=out_dir))
    try:
        clip.processor.save_pretrained(staging)  # tokenizer + image processor beside the models
        run = _PartExporter(clip, staging, metadata, checks, data, evaluate.TorchReference.compute(clip, data), limits)
        records = [record for name in parts for record in run.all_precisions(get_part(name, clip.family), precisions)]
        head_file = None
        if head_labels:
            info = {k: metadata[k] for k in ("base_model", "adapter_sha256", "recipe", "merge_base")}
            evaluate.build_head(clip, head_labels, prompt_template, info).save(staging / HEAD_FILE)
            head_file = HEAD_FILE
        result = _result(records, parts, limits, eval_data, run.reference, merge_report, head_file, out_dir)
        _manifest(clip, metadata, prompt_template, run.reference, records, head_file, result).write(staging)
        _install(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if result.ok:
        log.info("exported %s: every check passed (max abs diff %.2e)", out_dir, result.max_abs_diff)
    else:
        log.warning("exported %s with problems: %s", out_dir, "; ".join(result.problems))
    return result


def _warn_about_untrained_classes(eval_data: LabeledImages | None, training: TrainingInfo | None) -> None:
    """An evaluation class the run never saw is scored as if it had been: say so (its accuracy means little)."""
    if eval_data is None or training is None or training.class_names is None:
        return
    unseen = sorted(set(eval_data.class_names) - set(training.class_names))
    if unseen:
        log.warning(
            "eval data classes %s were not among the run's classes %s; their scores test zero-shot transfer, "
            "not what federation trained",
            unseen[:10],
            list(training.class_names)[:10],
        )


def _scoring_set(eval_data: LabeledImages | None, labels: list[str] | None, template: str) -> evaluate.ScoringSet:
    if eval_data is not None:
        return evaluate.ScoringSet(
            list(eval_data.images), eval_data.labels, list(eval_data.class_names), template, "eval data (labelled)"
        )
    return evaluate.ScoringSet(
        synthetic_images(32), None, labels or ["cat", "dog"], template, "32 synthetic images (pass --eval-data)"
    )


@dataclass
class _PartExporter:
    clip: LoadedClip
    staging: Path
    metadata: dict[str, str]
    checks: dict[str, dict[str, Any]]
    data: evaluate.ScoringSet
    reference: evaluate.TorchReference
    limits: Limits

    def all_precisions(self, part: OnnxPart, precisions: Sequence[str]) -> list[ExportRecord]:
        sample = trace_sample(self.clip, self.data.prompts, self.data.images[:4])
        fp32_path = export_part(
            self.clip.model, part, sample, self.staging / part.filename("fp32"), metadata=self.metadata
        )
        torch_refs = {name: torch_outputs(self.clip.model, part, inputs) for name, inputs in self.checks.items()}
        fp32_record, fp32_logits = self.score(part, "fp32", fp32_path, torch_refs, None)
        records = [fp32_record]
        for precision in precisions:
            if precision == "int8":
                records.append(self.int8(part, fp32_path, torch_refs, fp32_logits))
            elif precision != "fp32":
                path = make_precision(precision, fp32_path, self.staging / part.filename(precision), self.metadata)
                records.append(self.judge_agreement(self.score(part, precision, path, torch_refs, fp32_logits)[0]))
        for record in records:
            reference = "PyTorch" if record.precision == "fp32" else "fp32"
            log.log(
                logging.INFO if record.passed else logging.WARNING,
                "%s: %.2f MB, %.2f ms per call (batch 1, CPU), top-1 agreement with %s %.1f%%%s%s",
                record.file,
                record.bytes / 1e6,
                record.latency_ms_batch1_cpu,
                reference,
                100 * record.agreement(reference.lower()),
                f" (int8 scheme {record.int8_scheme})" if record.int8_scheme else "",
                "" if record.passed else " (BELOW THRESHOLD)",
            )
        return records

    def score(
        self, part: OnnxPart, precision: str, path: Path, torch_refs, fp32_logits
    ) -> tuple[ExportRecord, np.ndarray]:
        """Validate against PyTorch, score on the scoring set (agreement with fp32 when it is given), time it."""
        record = self.validate(part, precision, path, torch_refs)
        max_len = self.clip.model.config.text_config.max_position_embeddings
        logits = evaluate.onnx_logits(
            part.name, path, self.staging, self.data, self.reference, max_len, self.clip.family
        )
        record.test = evaluate.score(logits, self.data, fp32_logits=fp32_logits, torch_logits=self.reference.logits)
        record.latency_ms_batch1_cpu = self.latency(part, path)
        return record, logits

    def int8(self, part: OnnxPart, fp32_path: Path, torch_refs, fp32_logits: np.ndarray) -> ExportRecord:
        """Quantize with each scheme in turn (auto) until one meets the agreement threshold.

        The one kept is the first that passes, else the one that agreed best (ties: the faster);
        the others are deleted. Every attempt, with its agreement, size and latency, is in the
        record's `int8_attempts`, so the speed given up for agreement is visible.
        """
        mode = self.limits.int8_scheme
        schemes = list(INT8_SCHEMES) if mode == "auto" else [mode]
        final = self.staging / part.filename("int8")
        attempts: list[dict[str, Any]] = []
        best: tuple[ExportRecord, Path, str] | None = None
        for scheme in schemes:
            try:
                path = make_precision(
                    "int8", fp32_path, final.with_name(f".{scheme}.{final.name}"), self.metadata, int8_scheme=scheme
                )
            except ValueError as exc:  # e.g. its fp32 MatMuls are named otherwise in this graph
                if mode != "auto":
                    raise
                log.warning("%s: int8 scheme %s does not apply (%s); trying the next scheme", final.name, scheme, exc)
                attempts.append({"scheme": scheme, "error": str(exc)})
                continue
            record, _ = self.score(part, "int8", path, torch_refs, fp32_logits)
            record.file = final.name
            self.judge_agreement(record)
            agreement = record.agreement("fp32")
            attempts.append(
                {
                    "scheme": scheme,
                    "agreement_with_fp32": agreement,
                    "bytes": record.bytes,
                    "latency_ms_batch1_cpu": record.latency_ms_batch1_cpu,
                }
            )
            if best is None or agreement > best[0].agreement("fp32"):
                best = (record, path, scheme)
            if record.passed:
                break
            if scheme != schemes[-1]:
                log.info(
                    "%s: int8 scheme %s agrees %.1f%% with fp32, below %.0f%%; trying the next scheme",
                    final.name,
                    scheme,
                    100 * agreement,
                    100 * self.limits.agreement_threshold,
                )
        if best is None:
            raise ValueError(f"{final.name}: no int8 scheme applies to this graph: {attempts}")
        record, path, scheme = best
        os.replace(path, final)
        for leftover in final.parent.glob(f".*.{final.name}"):
            leftover.unlink()
        record.int8_scheme, record.int8_attempts = scheme, attempts
        if not record.passed and len(attempts) > 1:
            record.problem += f" (kept {scheme}, the closest of the int8 schemes tried: {', '.join(schemes)})"
        return record

    def validate(self, part: OnnxPart, precision: str, path: Path, torch_refs) -> ExportRecord:
        """Compare with PyTorch on each input set; fp32 and fp16 raise past their bounds, int8 is reported."""
        record = ExportRecord(part=part.name, precision=precision, file=path.name, bytes=path.stat().st_size)
        for name, inputs in self.checks.items():
            stats = compare_outputs(torch_refs[name], onnx_outputs(path, part, inputs))
            if precision == "fp32":
                result = summarize(stats, tolerance=self.limits.tolerance, min_cosine=FP32_MIN_COSINE)
            elif precision == "fp16":
                tol = self.limits.fp16_tolerance
                result = summarize(
                    stats, tolerance=tol, min_cosine=FP16_MIN_COSINE, logits_tolerance=tol * self.reference.logit_scale
                )
            else:
                result = summarize(stats, tolerance=float("inf"))
            if precision != "int8":
                raise_unless_ok(result, f"{path.name} on {name} inputs")
            record.validation[name] = result.to_dict()
        return record

    def judge_agreement(self, record: ExportRecord) -> ExportRecord:
        agreement, threshold = record.agreement("fp32"), self.limits.agreement_threshold
        if agreement < threshold:
            record.passed = False
            record.problem = (
                f"{record.file}: top-1 agreement with fp32 is {agreement:.1%}, below the {threshold:.0%} "
                f"threshold on {self.data.description}; deploy the fp32 file instead, or accept the loss knowingly"
            )
        return record

    def latency(self, part: OnnxPart, path: Path) -> float:
        """Median ms for one image (and the scoring prompts) on ONNX Runtime's CPU provider."""
        session, _ = make_session(path, "cpu")
        inputs = self.checks["real"]
        feeds = {name: np.asarray(inputs[name][:1] if name == "pixel_values" else inputs[name]) for name in part.inputs}
        return median_latency_ms(lambda: session.run(None, feeds), repeats=self.limits.latency_repeats)


def _result(records, parts, limits, eval_data, reference, merge_report, head_file, out_dir) -> ExportResult:
    fp32 = [r for r in records if r.precision == "fp32"]
    primary = next(r for r in fp32 if r.part == parts[0])
    validations = [v for r in fp32 for v in r.validation.values()]
    scored = {}
    if eval_data is not None:
        scored = dict(
            onnxruntime_accuracy=primary.test["accuracy"],
            pytorch_accuracy=accuracy(reference.logits, eval_data.labels),
            test_max_abs_diff=max(r.test["max_abs_diff_vs_pytorch"] for r in fp32),
            test_examples=len(eval_data),
        )
    return ExportResult(
        path=str(out_dir / primary.file),
        bytes=primary.bytes,
        max_abs_diff=max(v["max_abs_diff"] for v in validations),
        min_cosine=min(v["min_cosine"] for v in validations),
        tolerance=limits.tolerance,
        agreement_threshold=limits.agreement_threshold,
        out_dir=str(out_dir),
        manifest=str(out_dir / MANIFEST_FILE),
        exports=records,
        merge_base=merge_report,
        zero_shot_head=str(out_dir / head_file) if head_file else None,
        **scored,
    )


def _manifest(clip, metadata, template, reference, records, head_file, result) -> Manifest:
    files: dict[str, dict[str, dict[str, Any]]] = {}
    for r in records:
        files.setdefault(r.part, {})[r.precision] = {
            "file": r.file,
            "bytes": r.bytes,
            "passed": r.passed,
            **({"int8_scheme": r.int8_scheme} if r.int8_scheme else {}),
        }
    return Manifest(
        base_model=metadata["base_model"],
        adapter_sha256=metadata["adapter_sha256"],
        recipe=metadata["recipe"],
        merge_base=metadata["merge_base"],
        prompt_template=template,
        logit_scale=reference.logit_scale,
        logit_bias=reference.logit_bias,
        family=clip.family.name,
        max_text_length=clip.model.config.text_config.max_position_embeddings,
        files=files,
        zero_shot_head=head_file,
        flora_version=__version__,
        report={k: v for k, v in result.to_dict().items() if k not in ("out_dir", "manifest", "path")},
    )


def _install(staging: Path, out_dir: Path) -> None:
    """Move staged files into `out_dir` (atomic per file, same filesystem), the manifest last."""
    umask = os.umask(0)
    os.umask(umask)
    manifest = staging / MANIFEST_FILE
    for item in sorted(staging.iterdir(), key=lambda p: p == manifest):
        # Atomic writers create files 0600 (mkstemp); a model directory is meant to be shared.
        os.chmod(item, 0o666 & ~umask)
        target = out_dir / item.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
