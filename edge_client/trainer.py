"""The local training loop: one round of training the recipe's adapter (LoRA factors, or the whole modules a
baseline recipe trains) on this device's data.

Read it top to bottom: load the global adapter, run the round's batches (`edge_client.schedule`: whole local epochs,
or a slice of one) of the model family's loss (CLIP: contrastive)
between each image and its text (its class prompt, or its caption), return the new adapter tensors
and scalar metrics. When the instruction names the run's class prompts (protocol 1.2, `class_prompts`), every
image of class data is contrasted with all of them, not only with the prompts present in its batch: a client
holding one class (label skew) would otherwise see no negative at all. Caption data keeps the in-batch loss.
The optimizer is rebuilt every round (FedAvg's convention: client state does not
leak across rounds).

What makes it fit a small device, all decided once, when the trainer is built:
- a quantized base (4-bit/8-bit) is prepared with peft's `prepare_model_for_kbit_training`;
- when the recipe leaves the vision tower frozen (the paper's), each image's embedding is computed
  once and cached (`edge_client.cache`, built by `edge_client.cache_build`), on disk across reboots
  and per image (a new image costs one embedding); the tower is then released from memory
  (`flora.modeling.residency`) and comes back only when an image must be embedded; otherwise images
  are preprocessed once and go through the vision tower every step;
- with a memory budget, the micro-batch and activation checkpointing are chosen by measuring real
  steps (`edge_client.memory_budget`); the coordinator's batch size is then reached by accumulating
  gradients. The contrastive loss couples every image of a batch with every text, so accumulation
  uses the gradient-cache method (Gao et al., 2021): embed the whole batch without a graph, take the
  loss's gradient with respect to the embeddings, then re-embed micro-batch by micro-batch with a
  graph and back-propagate those gradients. Same gradient as one big batch, a micro-batch's memory.
Each distinct text (class prompt or caption) of a batch is encoded once per step, not once per image.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_client import onnx_vision
from edge_client.cache import EmbeddingStore, ModelKeyMemo, image_key
from edge_client.cache_build import embed_images, resolve_cache_precision
from edge_client.memory_budget import BatchPlan, PeakMemoryMeter, plan_batches, release_freed_memory
from edge_client.schedule import round_batches
from flora.algorithms import ClientHook, client_hooks_from_instruction
from flora.data.datasets import LabeledImages, pixel_values
from flora.errors import ConfigError, ProtocolError
from flora.modeling import scoring
from flora.modeling.adapter import attach_lora, get_adapter_state, set_adapter_state
from flora.modeling.kbit import is_quantized, prepare_quantized_for_training, set_activation_checkpointing
from flora.modeling.loading import LoadedClip
from flora.modeling.recipes import LoraRecipe
from flora.modeling.residency import is_released, release_image_path, restore_image_path
from flora.protocol.schema import TRAIN_SETTINGS, check_fields

log = logging.getLogger(__name__)

AUTOCAST_MODES = ("auto", "off", "float16", "bfloat16")


@dataclass(frozen=True)
class TrainSettings:
    """Hyper-parameters the coordinator sends with each instruction (defaults: the paper's AdamW settings)."""

    local_epochs: float = 1  # a fraction (1.3's `round_epochs`) walks one stream of batches over rounds (schedule.py)
    learning_rate: float = 5e-5
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    optimizer: str = "adamw"  # 1.3: or "sgd" (plain, no momentum; weight decay as L2), for a server optimizer
    batch_size: int = 128
    prompt_template: str = scoring.DEFAULT_TEMPLATE
    client_hooks: tuple[ClientHook, ...] = ()  # the strategy's client halves (FedProx, FFA-LoRA, ...), in order
    class_prompts: tuple[str, ...] = ()  # the run's class prompts (1.2): class data contrasts with all of them
    logit_calibration: float = 0.0  # FedLC's tau (1.2): with class prompts, logits minus tau * n_class^(-1/4)

    @classmethod
    def from_instruction(cls, data: dict[str, Any]) -> TrainSettings:
        """The instruction's `train` object, validated; ValueError names what is wrong (the agent logs it)."""
        try:  # type and range of every field (flora/protocol/schema.py): a value from the network never reaches torch
            data = check_fields(TRAIN_SETTINGS, data, "the instruction's train settings")
        except ProtocolError as exc:
            raise ValueError(exc.detail) from None
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "client_hooks"}
        known["class_prompts"] = tuple(data.get("class_prompts") or ())
        if "round_epochs" in data:  # 1.3: the exact epochs of a round; `local_epochs` is its whole-number stand-in
            known["local_epochs"] = data["round_epochs"]
        specs = data.get("client_hooks")
        if specs is None:
            # Coordinators of protocol 1.0 before `client_hooks` sent FedProx and FFA-LoRA as these two
            # keys (docs/PROTOCOL.md §5.2): read them as the hooks they meant.
            specs = [{"name": "fedprox", "params": {"mu": data["proximal_mu"]}}] if data.get("proximal_mu") else []
            specs += [{"name": "ffa_lora", "params": {}}] if data.get("freeze_lora_a") is True else []
        settings = cls(**known, client_hooks=client_hooks_from_instruction(specs))
        if not settings.local_epochs > 0 or settings.batch_size < 1 or not settings.learning_rate > 0:
            raise ValueError(f"invalid training settings from coordinator: {settings}")
        return settings


def make_optimizer(params, settings: TrainSettings):
    """The round's optimizer, fresh each round. AdamW is the paper's. Plain SGD (1.3) is for a server optimizer
    (fedavgm, fedadam): an AdamW step is normalised per client, so averaging the clients' steps is not a step along
    the average gradient; with SGD, one step a round (a fraction of an epoch) averages into exactly that."""
    import torch

    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    return torch.optim.AdamW(
        params, lr=settings.learning_rate, betas=settings.betas, eps=settings.eps, weight_decay=settings.weight_decay
    )


def resolve_autocast(mode: str, device: str):
    """The autocast dtype: 'auto' is bfloat16 (float16 where bf16 is missing) on CUDA and off on CPU."""
    import torch

    if mode not in AUTOCAST_MODES:
        raise ConfigError(f"autocast must be one of {', '.join(AUTOCAST_MODES)}, got {mode!r}")
    if mode == "off" or (mode == "auto" and not device.startswith("cuda")):
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, mode)


class LocalTrainer:
    def __init__(
        self,
        clip: LoadedClip,
        recipe: LoraRecipe,
        data: LabeledImages,
        *,
        seed: int = 0,
        max_batch_size: int = 128,
        progress: bool = True,
        cache_dir: str | Path | None = None,
        cache_image_embeddings: bool = True,
        memory_budget_mb: float | None = None,
        gradient_checkpointing: str = "auto",
        autocast: str = "auto",
        cache_precision: str = "auto",
        release_vision_tower: bool = True,
        shared_model: Any | None = None,
    ):
        """`shared_model`: a PeftModel of `clip` that already carries `recipe`'s adapter, for virtual clients of a
        simulation that share one frozen base and train one after another (each round loads its adapter)."""
        if len(data) == 0:
            raise ConfigError("no local training examples")
        self.clip = clip
        self.recipe = recipe
        self.data = data
        self.seed = seed
        self.max_batch_size = max_batch_size
        self.memory_budget_mb = memory_budget_mb  # also bounds the image-cache build's chunks
        self.progress = progress
        self.device = clip.device
        self.autocast_dtype = resolve_autocast(autocast, self.device)
        self.meter = PeakMemoryMeter(self.device)
        self.family = clip.family  # what differs between CLIP, SigLIP, ...: embeddings, loss, image path
        if shared_model is None:
            prepare_quantized_for_training(clip.model)
            self.model = attach_lora(clip.model, recipe, seed=seed)
        else:
            self.model = shared_model
        # Authoritative, whatever the recipe's regex says: does anything on the image path train?
        self.trains_images = any(
            p.requires_grad and self.family.on_image_path(name) for name, p in self.model.named_parameters()
        )
        # and on the text path? Not for the image-only baselines (linear-probe, vision-head): their text
        # embeddings are constants, and a backward pass through them would have nothing to reach.
        self.trains_text = any(
            p.requires_grad and not self.family.on_image_path(name) for name, p in self.model.named_parameters()
        )
        self.cache_dir = cache_dir
        self.caching = cache_image_embeddings and not self.trains_images
        self.release_vision_tower = release_vision_tower and self.caching
        self.cache_precision = resolve_cache_precision(
            cache_precision,
            device=self.device,
            autocast_dtype=self.autocast_dtype,
            quantized=is_quantized(clip.model),
            weights_dtype=clip.compute_dtype,
        )
        self._model_key: str | None = None  # the image path's fingerprint, taken while it is resident
        self.cache_seconds = self.cache_cpu_seconds = 0.0
        # "onnx-int8": wall and CPU seconds the last cache build spent building the base's ONNX file (0: it was there)
        self.vision_file_seconds = (0.0, 0.0)
        self.set_data(data)
        self.plan: BatchPlan = self.fit_memory_budget(memory_budget_mb, gradient_checkpointing)
        self._rounds_trained = 0

    @property
    def num_examples(self) -> int:
        return len(self.data)

    def adapter_state(self):
        return get_adapter_state(self.model)

    # -- image side -------------------------------------------------------------------------
    def _autocast(self):
        import torch

        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.split(":")[0], dtype=self.autocast_dtype)

    def set_data(self, data: LabeledImages) -> None:
        """Train on `data` from now on (e.g. a camera added images): only new or changed images are embedded."""
        import torch

        if len(data) == 0:
            raise ConfigError("no local training examples")
        self.data = data
        self.text_index = torch.as_tensor(data.labels, device=self.device)
        self.image_embeds = None  # [N, D] fp32, when the vision tower is frozen and caching is on
        self.pixels = None  # [N, 3, H, W], otherwise
        self.cache_status = "off"
        self.cache_embedded = 0  # images run through the vision tower by the last cache update
        if self.caching:
            self._load_or_build_image_cache(self.cache_dir)
        else:
            self.pixels = pixel_values(self.clip.image_processor, data.images).to(self.device)

    def _current_model_key(self) -> str:
        precision = f"{self.clip.compute_dtype}/autocast={self.autocast_dtype}/cache={self.cache_precision}"
        if self.cache_precision == "onnx-int8":  # its rows also depend on the int8 scheme and the runtime
            precision += f"/{onnx_vision.runtime_tag()}"
        return ModelKeyMemo(self.cache_dir).model_key(self.clip, precision=precision)

    def _load_or_build_image_cache(self, cache_dir: str | Path | None) -> None:
        """Every image's embedding, from the store where it holds the image's row, else computed; then the
        store is rewritten with the current images' rows and the vision tower released (see the docstring)."""
        import torch

        started, started_cpu = time.perf_counter(), time.process_time()
        store = EmbeddingStore(cache_dir)
        if self._model_key is None:
            self._model_key = self._current_model_key()  # the tower is resident: built with this trainer
        keys = [image_key(image) for image in self.data.images]
        rows, why = store.load(self._model_key)
        missing = {key: i for i, key in enumerate(keys) if key not in rows}  # one per distinct image
        if missing:
            if is_released(self.clip):
                restore_image_path(self.clip)
                key = self._current_model_key()
                if key != self._model_key:  # the checkpoint on disk changed since: every row is stale
                    log.info("image embeddings: the base model changed on disk; embedding every image again")
                    self._model_key, rows, why = key, {}, "base model changed"
                    missing = {k: i for i, k in enumerate(keys) if k not in rows}
            chunk = max(1, min(self.max_batch_size, 256))
            onnx_tower = None
            if self.cache_precision == "onnx-int8":
                onnx_tower = onnx_vision.OnnxVisionTower(self.clip, self.model, cache_dir, self._model_key)
                self.vision_file_seconds = (onnx_tower.build_seconds, onnx_tower.build_cpu_seconds)
            try:
                embeds = embed_images(
                    self.clip,
                    self.model,
                    [self.data.images[i] for i in missing.values()],
                    precision=self.cache_precision,
                    autocast_dtype=self.autocast_dtype,
                    chunk=chunk,
                    memory_budget_mb=self.memory_budget_mb,
                    discard_tower_after=self.release_vision_tower,
                    onnx_tower=onnx_tower,
                )
            finally:
                if onnx_tower is not None:
                    onnx_tower.close()
            rows.update(zip(missing, embeds.cpu()))
        current = {key: rows[key] for key in keys}  # the rows of images no longer here are dropped
        if missing:
            store.save(current, self._model_key)
        self.image_embeds = torch.stack([current[key] for key in keys]).to(self.device)
        self.cache_embedded = len(missing)
        self.cache_status = "hit" if not missing else "built" if len(missing) == len(set(keys)) else "updated"
        if missing:
            log.info("image embeddings: computed %d of %d images (%s)", len(missing), len(keys), why)
        else:
            log.info("image embeddings: reusing the cache in %s (%d images)", store.path, len(keys))
        released = release_image_path(self.clip) if self.release_vision_tower else 0
        if missing:  # the build's activations, freed to the C heap, go back to the OS (~95 MB on ViT-B/32)
            # Released: the tower is gone already (by reference counting, or by the release's own collection),
            # and the activations went when the build returned; without the release, collect what may hold it.
            release_freed_memory(collect=not released)
        self.cache_seconds = time.perf_counter() - started
        self.cache_cpu_seconds = time.process_time() - started_cpu  # the process's: steadier on a loaded machine

    def evaluate_local(self, template: str = scoring.DEFAULT_TEMPLATE) -> dict[str, float]:
        """Zero-shot accuracy and loss of the current adapter on the local data, from the cached embeddings
        when there are some (the vision tower is not needed), else through the tower."""
        import torch

        text_inputs = self.family.tokenize(self.clip.tokenizer, self.data.texts(template), self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                ids = torch.arange(len(self.data.class_names), device=self.device)
                texts = self._text_embeddings(text_inputs, ids, grad=False)
                if self.image_embeds is not None:
                    images = self.image_embeds
                else:
                    images = embed_images(
                        self.clip, self.model, self.data.images, precision="float32", chunk=self.max_batch_size
                    )
                scale, bias = self.family.logit_scale(self.model), self.family.logit_bias(self.model)
                logits = self.family.logits(images, texts, scale, bias)
                labels = torch.as_tensor(self.data.labels, device=logits.device)
                loss = torch.nn.functional.cross_entropy(logits.float(), labels)
                accuracy = (logits.argmax(dim=1) == labels).float().mean()
        finally:
            self.model.train(was_training)
        return {"accuracy": float(accuracy), "loss": float(loss)}

    def _image_embeddings(self, idx, *, grad: bool):
        import torch

        if self.image_embeds is not None:
            return self.image_embeds[idx]
        with torch.set_grad_enabled(grad), self._autocast():
            return self.family.image_embeddings(self.model, self.pixels[idx]).float()

    def _text_embeddings(self, text_inputs: dict[str, Any], ids, *, grad: bool):
        import torch

        rows = self.family.text_rows(text_inputs, ids)  # CLIP drops padding columns no row of this batch uses
        with torch.set_grad_enabled(grad), self._autocast():
            return self.family.text_embeddings(self.model, rows).float()

    # -- one batch ----------------------------------------------------------------------------
    def _rng_state(self):
        import torch

        cuda = torch.cuda.get_rng_state(self.device) if self.device.startswith("cuda") else None
        return torch.get_rng_state(), cuda

    def _set_rng_state(self, state) -> None:
        import torch

        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], self.device)

    def round_texts(self, settings: TrainSettings):
        """(texts, text index per example, every_text) for one round.

        In-batch (no class prompts, or caption data): this client's own texts, and each batch contrasts with
        the distinct texts it holds. With the run's class prompts: those prompts (plus any local class the
        run does not name, so no example loses its target), and every batch contrasts with all of them.
        """
        import torch

        local = self.data.texts(settings.prompt_template)
        if not settings.class_prompts or self.data.text_kind == "caption":
            return local, self.text_index, False
        texts = list(settings.class_prompts)
        position = {text: i for i, text in enumerate(texts)}
        for text in local:
            position.setdefault(text, len(texts))
            if position[text] == len(texts):
                texts.append(text)
        mapping = torch.as_tensor([position[text] for text in local], device=self.device)
        return texts, mapping[self.text_index], True

    def calibration(self, text_index, texts: int, tau: float):
        """FedLC's logit calibration (Zhang et al., ICML 2022) for label skew: during local training each class's
        logit is lowered by tau * n^(-1/4), n its local count (at least 1, so a class this client lacks gets the
        largest shift). The softmax then stops pushing the classes the client rarely sees as hard away from its
        images as their counts alone would, which is what pulls the skewed clients' updates apart. None when off."""
        import torch

        if tau <= 0:
            return None
        counts = torch.bincount(text_index, minlength=texts).float().clamp(min=1)
        return -tau * counts.pow(-0.25)

    def _accumulate_gradients(
        self, idx, text_inputs: dict[str, Any], micro: int, scaler=None, every_text=None, calibration=None
    ):
        """Add d(loss)/d(params) of the family's loss over examples `idx` to `.grad`; return the loss.

        `every_text` (a text index per example, from `round_texts`) contrasts each image with every text of
        `text_inputs`; without it, only with the distinct texts of this batch.
        One pass when the batch fits in `micro`, else the gradient-cache method (see the module docstring).
        """
        import torch

        def backward(tensor, grad=None):
            if scaler is not None and grad is None:
                tensor = scaler.scale(tensor)  # grads handed back below come from the scaled loss already
            tensor.backward(grad)

        if every_text is None:
            text_ids, targets = torch.unique(self.text_index[idx], return_inverse=True)
        else:
            text_ids = torch.arange(next(iter(text_inputs.values())).shape[0], device=idx.device)
            targets = every_text[idx]
        scale, bias = self.family.logit_scale(self.model), self.family.logit_bias(self.model)
        if calibration is not None:  # a per-text shift of logits_per_image [images, texts]; see `calibration`
            bias = calibration if bias is None else bias + calibration
        if len(idx) <= micro and len(text_ids) <= micro:
            images = self._image_embeddings(idx, grad=self.trains_images)
            texts = self._text_embeddings(text_inputs, text_ids, grad=self.trains_text)
            loss = self.family.loss(images, texts, targets, scale, bias)
            backward(loss)
            return loss.detach()
        text_chunks = text_ids.split(micro)
        image_chunks = idx.split(micro) if self.trains_images else []
        text_states, image_states = [], []
        with torch.no_grad():
            parts = []
            for chunk in text_chunks:
                text_states.append(self._rng_state())
                parts.append(self._text_embeddings(text_inputs, chunk, grad=False))
            texts = torch.cat(parts)
            if self.trains_images:
                parts = []
                for chunk in image_chunks:
                    image_states.append(self._rng_state())
                    parts.append(self._image_embeddings(chunk, grad=False))
                images = torch.cat(parts)
            else:
                images = self._image_embeddings(idx, grad=False)
        texts.requires_grad_(self.trains_text)
        images = images.detach().requires_grad_(self.trains_images)
        loss = self.family.loss(images, texts, targets, scale, bias)
        backward(loss)
        for chunk, state, grad in zip(text_chunks, text_states, texts.grad.split(micro) if self.trains_text else []):
            self._set_rng_state(state)  # same dropout masks as in the pass without a graph
            backward(self._text_embeddings(text_inputs, chunk, grad=True), grad)
        for chunk, state, grad in zip(image_chunks, image_states, images.grad.split(micro) if image_chunks else []):
            self._set_rng_state(state)
            backward(self._image_embeddings(chunk, grad=True), grad)
        return loss.detach()

    def _trainable(self) -> list[Any]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def batch_gradients(
        self,
        indices,
        template: str = scoring.DEFAULT_TEMPLATE,
        *,
        micro: int | None = None,
        class_prompts: tuple[str, ...] = (),
        logit_calibration: float = 0.0,
    ):
        """(loss, {parameter name: gradient}) of one batch, without changing the adapter (tests, diagnostics)."""
        import torch

        settings = TrainSettings(
            prompt_template=template, class_prompts=tuple(class_prompts), logit_calibration=logit_calibration
        )
        texts, text_index, every_text = self.round_texts(settings)
        calibration = self.calibration(text_index, len(texts), settings.logit_calibration) if every_text else None
        text_inputs = self.family.tokenize(self.clip.tokenizer, texts, self.device)
        idx = torch.as_tensor(np.asarray(indices), device=self.device)
        self.model.zero_grad(set_to_none=True)
        self.model.train()
        loss = self._accumulate_gradients(
            idx, text_inputs, micro or len(idx), every_text=text_index if every_text else None, calibration=calibration
        )
        grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None}
        self.model.zero_grad(set_to_none=True)
        return float(loss), grads

    def fit_memory_budget(self, budget_mb: float | None, gradient_checkpointing: str = "auto") -> BatchPlan:
        """Choose (by measuring) the micro-batch and checkpointing for every later round; see memory_budget."""
        baseline = None
        if budget_mb is not None:
            self.meter.reset()
            baseline = self.meter.current_mb()
        self.plan = plan_batches(
            self.measure_step_mb,
            largest=min(self.max_batch_size, self.num_examples),
            budget_mb=budget_mb,
            checkpointing=gradient_checkpointing,
            baseline_mb=baseline,
        )
        set_activation_checkpointing(self.clip.model, self.plan.activation_checkpointing)
        if budget_mb is not None:
            log.info(
                "memory budget %.0f MB: micro-batch %d%s (measured %.0f MB)",
                budget_mb,
                self.plan.micro_batch_size,
                ", gradient checkpointing" if self.plan.activation_checkpointing else "",
                self.plan.peak_mb,
            )
        return self.plan

    def measure_step_mb(self, micro: int, checkpointing: bool) -> float:
        """Peak memory (MB) of one forward+backward at micro-batch `micro`, plus the optimizer's state."""
        import torch

        set_activation_checkpointing(self.clip.model, checkpointing)
        text_inputs = self.family.tokenize(self.clip.tokenizer, self.data.texts(scoring.DEFAULT_TEMPLATE), self.device)
        # A random sample, not the first rows: a sorted image folder would give one class, and one text.
        order = np.random.default_rng(self.seed).permutation(self.num_examples)[:micro]
        idx = torch.as_tensor(order, device=self.device)
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        self.meter.reset()
        self._accumulate_gradients(idx, text_inputs, micro)
        peak = self.meter.peak_mb()
        self.model.zero_grad(set_to_none=True)
        adam_state_mb = 2 * sum(p.numel() * 4 for p in self._trainable()) / 2**20  # exp_avg + exp_avg_sq, fp32
        return peak + adam_state_mb

    # -- one round ---------------------------------------------------------------------------
    def train_round(
        self,
        global_adapter: dict[str, Any],
        settings: TrainSettings,
        round_: int,
        hooks: tuple[ClientHook, ...] | list[ClientHook] = (),
    ):
        """Train from `global_adapter`; returns (new adapter tensors, metrics).

        The algorithm's client hooks (flora.algorithms.ClientHook) run at three points: which LoRA
        parameters train, an extra loss term each step, and the update before it is returned. The
        instruction's hooks (`settings.client_hooks`) run first, then `hooks`, the device's own
        (local DP), so nothing changes the update after its noise.
        """
        import torch
        from tqdm import tqdm

        hooks = [*settings.client_hooks, *hooks]
        if self.release_vision_tower:
            release_image_path(self.clip)  # an evaluation may have brought it back: training does not need it
        received = {k: torch.as_tensor(v) for k, v in global_adapter.items()}
        set_adapter_state(self.model, received)
        device = self.device
        texts, text_index, every_text = self.round_texts(settings)
        text_inputs = self.family.tokenize(self.clip.tokenizer, texts, device)
        calibration = self.calibration(text_index, len(texts), settings.logit_calibration) if every_text else None
        every_text = text_index if every_text else None
        for name, param in self.model.named_parameters():
            if "lora_" in name:  # hooks choose among LoRA factors (FFA-LoRA: not A); whole modules always train
                param.requires_grad = all(hook.trains(name) for hook in hooks)
        trainable = {name: p for name, p in self.model.named_parameters() if p.requires_grad}
        params = list(trainable.values())
        loss_hooks = [hook for hook in hooks if hook.adds_loss_term]
        # The round's start values, only when a loss term needs them (a copy of every trainable tensor).
        start_values = {name: p.detach().clone() for name, p in trainable.items()} if loss_hooks else {}
        optimizer = make_optimizer(params, settings)
        scaler = None
        if self.autocast_dtype == torch.float16 and device.startswith("cuda"):
            scaler = torch.amp.GradScaler("cuda")  # fp16 gradients underflow without loss scaling
        batch_size = min(settings.batch_size, self.num_examples)  # the coordinator's, always
        micro, accumulation = self.plan.for_batch(batch_size)
        batches = round_batches(self.num_examples, batch_size, settings.local_epochs, self.seed, round_)
        self.model.train()
        self.meter.reset(collect=False)  # no gc.collect: it would cost more than a step here
        started = time.perf_counter()
        losses: list[float] = []
        step_seconds: list[float] = []
        bar = tqdm(
            total=len(batches),
            desc=f"round {round_}",
            unit="step",
            # Only on a terminal: under systemd the bar's carriage returns garble journald's lines.
            disable=not (self.progress and sys.stderr.isatty()),
            leave=False,
        )
        for batch in batches:
            idx = torch.as_tensor(batch, device=device)
            step_started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = self._accumulate_gradients(idx, text_inputs, micro, scaler, every_text, calibration)
            for hook in loss_hooks:
                term = hook.loss_term(trainable, start_values)
                if term is not None:
                    (scaler.scale(term) if scaler is not None else term).backward()
                    loss = loss + term.detach()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"local loss became {loss.item()} in round {round_}; lower the learning rate")
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            losses.append(loss.item())  # .item() waits for the GPU, so the step time below is real
            step_seconds.append(time.perf_counter() - step_started)
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        bar.close()
        seconds = time.perf_counter() - started
        peak = self.meter.peak_mb()
        first_round = self._rounds_trained == 0
        self._rounds_trained += 1
        metrics = {
            "num_examples": self.num_examples,
            "train_loss": float(np.mean(losses)),
            "train_loss_last": losses[-1],
            "steps": len(losses),
            "batch_size": batch_size,
            "micro_batch_size": micro,
            "accumulation_steps": accumulation,
            "gradient_checkpointing": int(self.plan.activation_checkpointing),
            "seconds": seconds,
            "step_seconds": float(np.median(step_seconds)),
            "peak_memory_mb": peak,
            "peak_memory_kind": self.meter.kind,
            "image_embeddings_cached": int(self.image_embeds is not None),
            "vision_tower_released": int(is_released(self.clip)),
            "skipped_images": self.data.skipped,
            "texts_contrasted": len(texts),  # all of the run's class prompts, or this client's own texts
        }
        if first_round and self.image_embeds is not None:
            metrics["cache_seconds"] = self.cache_seconds  # one-off: building (or loading) the image embeddings
            metrics["cache_embedded"] = self.cache_embedded  # images the vision tower ran on for it
        tensors = self.adapter_state()
        for hook in hooks:
            tensors = hook.process_update(tensors, received)
            metrics.update(hook.metrics())
        return tensors, metrics
