"""The one settings object: environment variables `LORAGEN_*` and an optional TOML file.

The TOML file is `$LORAGEN_CONFIG` if set, else `./loragen.toml` when present. Environment
variables win over the file, and explicit arguments win over both.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)


def _toml_path() -> Path | None:
    explicit = os.environ.get("LORAGEN_CONFIG")
    if explicit:
        return Path(explicit)
    local = Path("loragen.toml")
    return local if local.is_file() else None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORAGEN_", extra="ignore")

    home: Path = Field(
        default_factory=lambda: Path("~/.cache/loragen").expanduser(),
        description="Where the demo world and caches live.",
    )
    registry: Path | None = Field(
        default=None, description="Registry directory; default: the demo world's registry."
    )
    generator: Path | None = Field(default=None, description="Trained generator directory.")
    encoder: str | None = Field(
        default=None,
        description="Sentence-transformers model path or hub id; default: packaged all-MiniLM-L6-v2.",
    )
    device: str = Field(default="cpu", description="cpu or cuda")
    softmax_temperature: float = Field(default=0.05, gt=0)
    top_k: int = Field(default=4, ge=1)
    inline_examples: bool = Field(
        default=True,
        description="Requests without examples use the input -> output pairs their description writes "
                    "out (e.g. 'garden -> nedrag') as examples, where the base model is a local causal LM.",
    )
    compile_decoder: bool = Field(
        default=False,
        description="icm and sg decode under torch.compile, replayed as CUDA graphs on a GPU (about 3x faster "
                    "decoding of 1-8 requests on an H200; each padded batch size compiles on first use).",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml = _toml_path()
        if toml is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml))
        return tuple(sources)

    @property
    def demo_dir(self) -> Path:
        return self.home / "demo"

    @property
    def registry_dir(self) -> Path:
        return self.registry if self.registry is not None else self.demo_dir / "registry"
