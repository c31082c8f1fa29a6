"""Zero-shot CLIP/SigLIP with ONNX Runtime alone: NumPy, Pillow, tokenizers, onnxruntime. No PyTorch.

`OnnxClip` runs whatever parts an export holds: image embeddings come from the vision tower
when present (else the whole model), text embeddings from the text tower (else the whole
model), and a precomputed zero-shot head replaces the text side entirely when it already
holds the requested labels, which is what lets a device ship only the vision model.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from export.manifest import Manifest
from export.parts import check_precision
from export.preprocess import ImagePreprocessor
from export.providers import make_session
from export.tokenizer import ClipTokenizer
from export.zero_shot import ZeroShotHead, class_prompts, l2_normalize
from flora.errors import ConfigError
from flora.modeling.families import CLIP, ModelFamily, get_family

log = logging.getLogger(__name__)


class OnnxClip:
    def __init__(
        self,
        files: dict[str, str | Path],
        preprocessor: ImagePreprocessor,
        *,
        logit_scale: float,
        logit_bias: float = 0.0,
        family: ModelFamily = CLIP,
        tokenizer_dir: str | Path | None = None,
        max_text_length: int | None = None,
        head: ZeroShotHead | None = None,
        provider: str = "cpu",
        threads: int | None = None,
        flagged: set[str] | None = None,
        announce: bool = True,
        prompt_template: str | None = None,
    ):
        if not files:
            raise ConfigError("no ONNX files to run")
        self.files = {part: Path(path) for part, path in files.items()}
        self.preprocess, self.logit_scale, self.head = preprocessor, float(logit_scale), head
        self.logit_bias, self.family = float(logit_bias), family
        self.tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else None
        self.max_text_length = max_text_length
        self.provider_requested, self.threads = provider, threads
        self.flagged = flagged or set()  # parts whose file failed its export checks
        self.prompt_template = prompt_template  # the export's: the one its adapter was trained with
        self.announce = announce  # log which execution provider ran (off for the export's own scoring)
        self.providers_used: dict[str, str] = {}
        self._sessions: dict[str, Any] = {}
        self._tokenizer: ClipTokenizer | None = None

    @classmethod
    def from_dir(
        cls, model_dir: str | Path, *, precision: str = "auto", provider: str = "cpu", threads: int | None = None
    ) -> OnnxClip:
        """Open an export directory, choosing per part the requested precision (auto: fp32, then int8, then fp16)."""
        model_dir = Path(model_dir)
        manifest = Manifest.read(model_dir)
        files, flagged = {}, set()
        for part in manifest.files:
            have = manifest.available(part)
            if precision == "auto":
                chosen = have[0] if have else None
            else:
                chosen = check_precision(precision) if precision in have else None
            if chosen is not None:
                entry = manifest.files[part][chosen]
                files[part] = model_dir / entry["file"]
                if entry.get("passed") is False:
                    flagged.add(part)
        if not files:
            listed = {part: manifest.available(part) for part in manifest.files}
            raise ConfigError(f"{model_dir} has no {precision} model; it holds {listed}. Pick one with --precision")
        missing = [str(path) for path in files.values() if not path.is_file()]
        if missing:
            raise ConfigError(
                f"files listed in {model_dir}'s manifest are missing: {missing}; copy the whole directory"
            )
        family = get_family(manifest.family)
        head = None
        if manifest.zero_shot_head:
            head_path = model_dir / manifest.zero_shot_head
            if not head_path.is_file():
                raise ConfigError(
                    f"{head_path} is listed in {model_dir}'s manifest but missing; copy it with the model"
                )
            head = ZeroShotHead.load(head_path)
        return cls(
            files,
            ImagePreprocessor.from_dir(model_dir, family),
            logit_scale=manifest.logit_scale,
            logit_bias=manifest.logit_bias,
            family=family,
            tokenizer_dir=model_dir,
            max_text_length=manifest.max_text_length,
            head=head,
            provider=provider,
            threads=threads,
            flagged=flagged,
            prompt_template=manifest.prompt_template,
        )

    # -- sessions -------------------------------------------------------------------------

    def session(self, part: str) -> Any:
        if part not in self._sessions:
            session, ran = make_session(self.files[part], self.provider_requested, threads=self.threads)
            self._sessions[part], self.providers_used[part] = session, ran
            log.log(
                logging.INFO if self.announce else logging.DEBUG,
                "execution provider: %s for %s (requested %s)",
                ran,
                self.files[part].name,
                self.provider_requested,
            )
            if part in self.flagged:
                log.warning(
                    "%s did not pass its checks at export (see the report in flora_export.json); "
                    "its predictions may differ from fp32",
                    self.files[part].name,
                )
        return self._sessions[part]

    @property
    def tokenizer(self) -> ClipTokenizer:
        if self._tokenizer is None:
            if self.tokenizer_dir is None:
                raise ConfigError("this model has no tokenizer; it can only classify with its zero-shot head")
            self._tokenizer = ClipTokenizer(
                self.tokenizer_dir, max_length=self.max_text_length, padding=self.family.text_padding
            )
        return self._tokenizer

    # -- embeddings -----------------------------------------------------------------------

    def image_embeddings(self, images: Sequence[Any], *, batch_size: int = 32) -> np.ndarray:
        """L2-normalised image embeddings [N, dim] of PIL images."""
        part = "vision" if "vision" in self.files else "model"
        if part not in self.files:
            raise ConfigError("this export has neither the vision tower nor the whole model; re-export with them")
        chunks = []
        for start in range(0, len(images), batch_size):
            feeds = {"pixel_values": self.preprocess(images[start : start + batch_size])}
            if part == "model":  # the whole model needs some text too; one short prompt costs little
                feeds.update(self.tokenizer(["a photo."]))
            (embeds,) = self.session(part).run(["image_embeds"], self._inputs_of(part, feeds))
            chunks.append(embeds)
        return l2_normalize(np.concatenate(chunks))  # re-normalise: fp16/int8 graphs drift slightly

    def text_embeddings(self, prompts: Sequence[str]) -> np.ndarray:
        part = "text" if "text" in self.files else "model"
        if part not in self.files:
            raise ConfigError(
                "this export has no text tower and no whole model, so it can only classify the labels of its "
                "zero-shot head; re-export with --parts text (or model), or with --labels set to your labels"
            )
        feeds = dict(self.tokenizer(prompts))
        if part == "model":  # the whole model needs an image too; one blank image costs little
            feeds["pixel_values"] = self.preprocess([_blank_image(self.preprocess)])
        (embeds,) = self.session(part).run(["text_embeds"], self._inputs_of(part, feeds))
        return l2_normalize(embeds)

    def _inputs_of(self, part: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The feeds the part's graph declares (SigLIP's text side takes no attention mask)."""
        names = {i.name for i in self.session(part).get_inputs()}
        return {k: v for k, v in feeds.items() if k in names}

    def similarity(self, image_embeds: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
        """logits_per_image as the model computes them: scale * cosine (+ the family's bias)."""
        return self.logit_scale * image_embeds @ text_embeds.T + self.logit_bias

    def label_embeddings(self, labels: Sequence[str] | None, template: str | None) -> tuple[list[str], np.ndarray]:
        """Text embeddings for `labels`, from the zero-shot head when it holds exactly these labels."""
        head = self.head
        same_labels = head is not None and (labels is None or list(labels) == head.labels)
        if same_labels and (template is None or template == head.prompt_template):
            return head.labels, head.embeddings
        if labels is None and head is None:
            raise ConfigError("this export has no zero-shot head; pass --labels with one class name per line")
        labels = head.labels if labels is None else labels
        template = template or (head.prompt_template if head else "a photo of a {label}.")
        return list(labels), self.text_embeddings(class_prompts(labels, template))

    def logits(
        self,
        images: Sequence[Any],
        labels: Sequence[str] | None = None,
        template: str | None = None,
        *,
        batch_size: int = 32,
    ) -> tuple[list[str], np.ndarray]:
        """CLIPModel's logits_per_image [N, num_labels], and the labels in column order."""
        labels, text = self.label_embeddings(labels, template)
        return labels, self.similarity(self.image_embeddings(images, batch_size=batch_size), text)


def _blank_image(preprocess: ImagePreprocessor) -> Any:
    from PIL import Image

    return Image.new("RGB", (preprocess.crop_width, preprocess.crop_height))
