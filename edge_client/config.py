"""Edge client settings: `flora client --config client.toml`, overridable by FLORA_CLIENT_* variables."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from edge_client.cache_build import CACHE_PRECISIONS
from edge_client.memory_budget import CHECKPOINTING_MODES
from edge_client.trainer import AUTOCAST_MODES
from flora.algorithms import LocalDP
from flora.config import field, load_config
from flora.data.formats import DATA_FORMAT_HELP, DATA_FORMATS
from flora.errors import ConfigError
from flora.modeling.loading import COMPUTE_DTYPES, QUANTIZATIONS
from flora.modeling.recipes import get_recipe
from flora.settings import NodeSettings

ENV_PREFIX = "FLORA_CLIENT_"


@dataclasses.dataclass(kw_only=True)
class ClientConfig(NodeSettings):
    """An edge device's settings: NodeSettings (identity, broker, wire, logging) plus its own."""

    model: str = field(help="CLIP checkpoint: hub id (openai/clip-vit-base-patch32) or local directory")
    data_dir: Path = field(help="local training data; never leaves the device")
    signing_key: Path | None = field(
        None, help="this device's Ed25519 private key (PEM, `flora provision`): signs every message it sends"
    )
    coordinator_public_key: Path | None = field(
        None, help="coordinator's Ed25519 public key (PEM): instructions and results not signed by it are refused"
    )
    data_format: str = field("image-folder", help=DATA_FORMAT_HELP)
    recipe: str = field("paper", help="LoRA recipe; must match the coordinator's")
    lora_rank: int | None = field(
        None, help="train at this lower LoRA rank than the recipe's (needs the coordinator's svd_lora strategy)"
    )
    quantization: str = field("none", help="base model quantization: none, 8bit, 4bit (NF4)")
    quantization_fallback: bool = field(
        True, help="if bitsandbytes cannot run here, warn and train an unquantized base (false: refuse to start)"
    )
    compute_dtype: str = field("float32", help="compute dtype: float32, float16, bfloat16")
    device: str = field("auto", help="auto, cuda or cpu")
    batch_size: int = field(
        32, help="largest micro-batch; the coordinator's batch size is reached by accumulating gradients"
    )
    memory_budget_mb: float | None = field(
        None,
        help="most memory a training step may use (peak CUDA allocation on a GPU, process peak RSS on CPU); "
        "the micro-batch and gradient checkpointing are chosen by measuring steps. None: no limit",
    )
    gradient_checkpointing: str = field("auto", help="auto (only when the memory budget needs it), on or off")
    autocast: str = field(
        "auto", help="mixed precision: auto (bfloat16/float16 on CUDA, off on CPU), off, float16, bfloat16"
    )
    cache_image_embeddings: bool = field(
        True, help="compute a frozen vision tower's image embeddings once and keep them in state_dir"
    )
    cache_precision: str = field(
        "auto",
        help="image cache precision: auto (autocast dtype on CUDA, float32 on CPU), float32, autocast, "
        "bfloat16 (CPU with AMX or AVX512-BF16, unquantized base: ~2.4x faster build, cosine >= 0.9999 to float32), "
        "int8 (CPU, unquantized base: ~1.6x faster build, cosine >= 0.999 to float32) or onnx-int8 (CPU, "
        "unquantized base: ONNX Runtime int8, ~3.4-3.6x faster build after a one-off file per base model)",
    )
    release_vision_tower: bool = field(
        True, help="once the image cache is complete, free the frozen vision tower; it reloads for new images"
    )
    dp_clip_norm: float | None = field(None, help="local DP: clip the update's change to this L2 norm (None: off)")
    dp_noise_multiplier: float | None = field(
        None, help="local DP: Gaussian noise std = dp_noise_multiplier x dp_clip_norm (needs dp_clip_norm)"
    )
    status_interval_s: float = field(
        60.0, help="seconds between status refreshes (health, last round trained) while the agent runs"
    )
    max_round_ahead: int = field(
        3,
        help="act on an unsigned instruction only up to this many rounds past the highest round seen "
        "(a forged far-ahead round would make the device refuse every genuine round before it); "
        "with coordinator_public_key a verified instruction may name any round",
    )
    state_dir: Path = field(Path("flora-client-state"), help="where progress survives a reboot")
    exit_when_finished: bool = field(False, help="exit when the coordinator ends the run (demo, tests)")
    seed: int = field(0, help="seed for local shuffling")

    def __post_init__(self):
        super().__post_init__()
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")
        if self.data_format not in DATA_FORMATS:
            raise ConfigError(f"data_format must be one of {', '.join(DATA_FORMATS)}, got {self.data_format!r}")
        if not self.status_interval_s >= 1:
            raise ConfigError(f"status_interval_s must be at least 1 second, got {self.status_interval_s}")
        if self.max_round_ahead < 1:
            raise ConfigError(f"max_round_ahead must be >= 1, got {self.max_round_ahead}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.memory_budget_mb is not None and not self.memory_budget_mb > 0:
            raise ConfigError(f"memory_budget_mb must be > 0 (or unset for no limit), got {self.memory_budget_mb}")
        if self.gradient_checkpointing not in CHECKPOINTING_MODES:
            raise ConfigError(
                f"gradient_checkpointing must be one of {', '.join(CHECKPOINTING_MODES)}, "
                f"got {self.gradient_checkpointing!r}"
            )
        if self.autocast not in AUTOCAST_MODES:
            raise ConfigError(f"autocast must be one of {', '.join(AUTOCAST_MODES)}, got {self.autocast!r}")
        if self.cache_precision not in CACHE_PRECISIONS:
            # The name only: whether this device can use it (CPU instructions, CUDA) is checked at start-up.
            raise ConfigError(
                f"cache_precision must be one of {', '.join(CACHE_PRECISIONS)}, got {self.cache_precision!r}"
            )
        LocalDP.from_settings(self.dp_clip_norm, self.dp_noise_multiplier)
        recipe = get_recipe(self.recipe)
        if self.lora_rank is not None and not recipe.has_lora:
            raise ConfigError(f"lora_rank: recipe {self.recipe!r} has no LoRA layers; remove lora_rank")
        if self.lora_rank is not None and not 1 <= self.lora_rank <= recipe.rank:
            raise ConfigError(f"lora_rank must be between 1 and the recipe's rank {recipe.rank}, got {self.lora_rank}")
        if self.quantization != "none" and recipe.modules_to_save:
            raise ConfigError(
                f"recipe {self.recipe!r} trains whole modules, which a quantized base cannot: set quantization = "
                '"none", or use a LoRA recipe (such as "paper") on the quantized base'
            )


def load_client_config(path: str | Path | None = None, **overrides) -> ClientConfig:
    return load_config(ClientConfig, path, env_prefix=ENV_PREFIX, overrides=overrides)
