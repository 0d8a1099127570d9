"""What a served model advertises besides a prompt (`engines.capabilities.image_inputs`) comes
from its family, read from disk without loading the model or importing torch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchserve.engines.capabilities import ALL_IMAGE_INPUTS, IMG2IMG, image_inputs
from batchserve.settings import Settings


def settings(model: str, family: str = "auto") -> Settings:
    return Settings(model=model, model_family=family, warmup="")


@pytest.mark.parametrize("model", ["tiny", "tiny-inpaint", "tiny-sdxl", "sim"])
def test_sd1_sdxl_and_the_sim_take_both(model: str) -> None:
    assert image_inputs(settings(model)) == ALL_IMAGE_INPUTS


@pytest.mark.parametrize(("pipeline", "expected"), [
    ("StableDiffusionPipeline", ALL_IMAGE_INPUTS),
    ("StableDiffusionXLPipeline", ALL_IMAGE_INPUTS),
    ("FluxPipeline", frozenset({IMG2IMG})),  # generic, whole through diffusers' img2img
    ("PixArtSigmaPipeline", frozenset()),  # generic without an img2img sibling
])
def test_a_model_folder_takes_what_its_family_does(tmp_path: Path, pipeline: str,
                                                   expected: frozenset[str]) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    assert image_inputs(settings(str(tmp_path))) == expected


def test_tiny_flux_takes_img2img_only() -> None:
    assert image_inputs(settings("tiny-flux")) == frozenset({IMG2IMG})


def test_an_asked_family_decides_and_nothing_on_disk_means_sd1(tmp_path: Path) -> None:
    assert image_inputs(settings(str(tmp_path / "absent"), "generic")) == frozenset()
    assert image_inputs(settings(str(tmp_path / "absent"))) == ALL_IMAGE_INPUTS
