"""Community model files on the tiny model: single-file checkpoints, embeddings, LoRA, VAE.

Every file is written by the test in the format users download (see `community.py`), loaded
through the real settings -> `DiffusionEngine.load` path, and judged by the images it makes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from community import (
    a1111_pt,
    a1111_safetensors,
    diffusers_embedding,
    kohya_lora,
    other_vae,
    same,
    vae_single_file,
    vectors,
)
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from ldm_layout import pipeline_state_dict, save_single_file
from PIL.Image import Image

from batchserve.engines import GenerationItem
from batchserve.engines.diffusion import DiffusionEngine
from batchserve.settings import Settings, SettingsError, parse_loras

from conftest import ServerProcess, running_server

ITEM = GenerationItem("a red cube", "", 7, 64, 64, 1, 7.5)


def load(**settings: object) -> DiffusionEngine:
    return DiffusionEngine.load(Settings(warmup="", **settings))  # type: ignore[arg-type]


def one(engine: DiffusionEngine, item: GenerationItem = ITEM) -> Image:
    (image,) = engine.generate([item])
    return image


def prompt(text: str, negative: str = "", seed: int = 7) -> GenerationItem:
    return GenerationItem(text, negative, seed, 64, 64, 1, 7.5)


@dataclass(frozen=True)
class Files:
    folder: Path
    single: Path
    embeddings: Path
    lora: Path
    lora_b: Path
    vae_folder: Path
    vae_file: Path


@pytest.fixture(scope="module")
def base() -> DiffusionEngine:
    return load(model="tiny")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, base: DiffusionEngine) -> Files:
    root = tmp_path_factory.mktemp("community")
    pipe = base.pipe
    pipe.save_pretrained(root / "tiny-sd")
    emb = root / "embeddings"
    emb.mkdir()
    a1111_pt(emb / "EasyNeg.pt", vectors(2, seed=1))  # two vectors, like EasyNegative's eight
    a1111_safetensors(emb / "Shiny.safetensors", vectors(1, seed=2))
    diffusers_embedding(emb / "Plain.safetensors", vectors(1, seed=3)[0])
    (emb / "notes.txt").write_text("not an embedding: ignored")
    vae = other_vae(pipe.vae, seed=5)
    vae.save_pretrained(root / "vae")
    return Files(
        folder=root / "tiny-sd",
        single=save_single_file(pipe, root / "tiny.safetensors"),
        embeddings=emb,
        lora=kohya_lora(root / "style.safetensors", pipe.unet, seed=4),
        lora_b=kohya_lora(root / "detail.safetensors", pipe.unet, seed=6),
        vae_folder=root / "vae",
        vae_file=vae_single_file(vae, root / "vae-ft.safetensors"),
    )


# -- single-file checkpoints -------------------------------------------------------------------

def test_test_writer_is_the_inverse_of_diffusers_conversion(base: DiffusionEngine) -> None:
    """The original-layout writer round-trips through diffusers' own LDM -> diffusers code."""
    pipe = base.pipe
    ldm = pipeline_state_dict(pipe)
    assert {k.split(".")[0] for k in ldm} == {"model", "first_stage_model", "cond_stage_model"}
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in ldm
    unet = convert_ldm_unet_checkpoint(ldm, pipe.unet.config)
    vae = convert_ldm_vae_checkpoint(ldm, pipe.vae.config)
    clip = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(ldm).items()}
    for converted, model in ((unet, pipe.unet), (vae, pipe.vae), (clip, pipe.text_encoder)):
        expected = model.state_dict()
        assert converted.keys() == expected.keys()
        assert all(torch.equal(converted[k], expected[k]) for k in expected)


def test_single_file_checkpoint_makes_the_images_of_the_diffusers_folder(
    base: DiffusionEngine, files: Files
) -> None:
    engine = load(model=str(files.single), model_config=str(files.folder))
    assert engine.info().demo is False
    items = [ITEM, prompt("a blue sphere", "blurry", seed=3)]
    for a, b in zip(base.generate(items), engine.generate(items), strict=True):
        assert same(a, b)


def test_ckpt_needs_allow_pickle(base: DiffusionEngine, files: Files, tmp_path: Path) -> None:
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": pipeline_state_dict(base.pipe)}, ckpt)
    with pytest.raises(SettingsError, match=r"--model=.*\.ckpt files are Python pickles.*"
                                            r"--allow-pickle"):
        load(model=str(ckpt), model_config=str(files.folder))
    engine = load(model=str(ckpt), model_config=str(files.folder), allow_pickle=True)
    assert same(one(engine), one(base))


def test_single_file_that_is_no_checkpoint_is_a_settings_error(files: Files,
                                                               tmp_path: Path) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(SettingsError, match=r"--model=.*junk.*cannot load it as a single-file"):
        load(model=str(junk), model_config=str(files.folder))


# -- textual-inversion embeddings --------------------------------------------------------------

@pytest.fixture(scope="module")
def embedded(files: Files) -> DiffusionEngine:
    return load(model="tiny", embeddings=str(files.embeddings), allow_pickle=True)


def test_embeddings_are_listed_with_their_vectors(embedded: DiffusionEngine) -> None:
    listed = {e["token"]: e["vectors"] for e in embedded.info().to_dict()["embeddings"]}
    assert listed == {"EasyNeg": 2, "Plain": 1, "Shiny": 1}


def test_each_format_puts_its_vectors_under_the_file_name(embedded: DiffusionEngine) -> None:
    """A1111 .pt, A1111 .safetensors and diffusers {token: vector}: token = file stem."""
    tok, weights = embedded.pipe.tokenizer, embedded.pipe.text_encoder.get_input_embeddings()
    expected = {"EasyNeg": vectors(2, 1)[0], "EasyNeg_1": vectors(2, 1)[1],
                "Shiny": vectors(1, 2)[0], "Plain": vectors(1, 3)[0]}
    for token, vector in expected.items():
        (token_id,) = tok(token, add_special_tokens=False).input_ids
        assert torch.allclose(weights.weight[token_id], vector)


def test_embedding_token_changes_the_image(base: DiffusionEngine,
                                           embedded: DiffusionEngine) -> None:
    assert same(one(embedded), one(base))  # prompts without tokens are untouched
    with_token = prompt("a red cube, Shiny")
    assert not same(one(embedded, with_token), one(base, with_token))
    negative = prompt("a red cube", "EasyNeg")
    assert not same(one(embedded, negative), one(base, negative))


def test_multi_vector_token_expands_in_any_case(embedded: DiffusionEngine) -> None:
    tok = embedded.pipe.tokenizer
    ids = {tok.convert_tokens_to_ids(t) for t in ("EasyNeg", "EasyNeg_1")}
    for text in ("EasyNeg", "easyneg", "blurry, EASYNEG, ugly"):
        (row,) = embedded.prompts._token_ids([text])
        assert ids <= set(row), text
    same_meaning = [prompt("a red cube", "EasyNeg"), prompt("a red cube", "easyneg")]
    a, b = embedded.generate(same_meaning)
    assert same(a, b)


def test_unknown_word_is_just_text(embedded: DiffusionEngine) -> None:
    image = one(embedded, prompt("a red cube, NotAnEmbedding", "AlsoUnknown"))
    assert image.size == (64, 64)


def test_requests_with_different_embeddings_share_a_batch(embedded: DiffusionEngine) -> None:
    items = [prompt("Shiny cube"), prompt("a cube", "EasyNeg", seed=2),
             prompt("Plain", "Shiny, EasyNeg", seed=3), prompt("no tokens", seed=4)]
    batched = embedded.generate(items)
    for item, image in zip(items, batched, strict=True):
        assert same(image, one(embedded, item)), item


def test_single_embedding_file_and_its_errors(files: Files, tmp_path: Path) -> None:
    engine = load(model="tiny", embeddings=str(files.embeddings / "Shiny.safetensors"))
    assert [e["token"] for e in engine.info().to_dict()["embeddings"]] == ["Shiny"]
    with pytest.raises(SettingsError, match=r"--embeddings=.*EasyNeg.pt.*--allow-pickle"):
        load(model="tiny", embeddings=str(files.embeddings / "EasyNeg.pt"))
    with pytest.raises(SettingsError, match=r"--embeddings=.*no such file or folder"):
        load(model="tiny", embeddings=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SettingsError, match=r"--embeddings=.*no \.safetensors"):
        load(model="tiny", embeddings=str(tmp_path / "empty"))
    a1111_safetensors(tmp_path / "SD15Only.safetensors", vectors(1, seed=1, dim=768))
    with pytest.raises(SettingsError, match=r"--embeddings: SD15Only.safetensors: not a "
                                            r"textual-inversion embedding for this model"):
        load(model="tiny", embeddings=str(tmp_path / "SD15Only.safetensors"))


# -- LoRA ----------------------------------------------------------------------------------------

def test_lora_scale_zero_is_the_base_model_and_one_changes_it(base: DiffusionEngine,
                                                              files: Files) -> None:
    zero = load(model="tiny", lora=f"{files.lora}:0")
    full = load(model="tiny", lora=str(files.lora))
    assert same(one(zero), one(base))
    assert all(torch.equal(a, b) for a, b in zip(zero.pipe.unet.state_dict().values(),
                                                  base.pipe.unet.state_dict().values(),
                                                  strict=True))
    assert not same(one(full), one(base))
    assert full.info().to_dict()["loras"] == [
        {"path": str(files.lora), "scale": 1.0, "components": ["unet"]}
    ]


def test_lora_is_fused_so_the_served_model_is_plain(files: Files) -> None:
    engine = load(model="tiny", lora=f"{files.lora}:0.7,{files.lora_b}:0.3")
    assert [x["scale"] for x in engine.info().to_dict()["loras"]] == [0.7, 0.3]
    assert not any("lora" in name for name, _ in engine.pipe.unet.named_modules())
    assert type(engine.pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0]
                .attn1.to_q) is torch.nn.Linear


def test_two_loras_add_up(base: DiffusionEngine, files: Files) -> None:
    both = load(model="tiny", lora=f"{files.lora}:1,{files.lora_b}:1")
    only_a = load(model="tiny", lora=str(files.lora))
    base_w, a_w, both_w = (
        e.pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn1.to_q.weight
        for e in (base, only_a, both)
    )
    assert not torch.allclose(both_w, a_w)
    b_only = load(model="tiny", lora=str(files.lora_b))
    b_w = b_only.pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn1.to_q.weight
    assert torch.allclose(both_w - base_w, (a_w - base_w) + (b_w - base_w), atol=1e-5)


def test_bad_lora_files_are_settings_errors(base: DiffusionEngine, tmp_path: Path) -> None:
    wide = kohya_lora(tmp_path / "sd15.safetensors", base.pipe.unet, seed=1, in_dim=320)
    with pytest.raises(SettingsError, match=r"--lora=.*sd15.safetensors.*does not fit"):
        load(model="tiny", lora=str(wide))
    alien = kohya_lora(tmp_path / "alien.safetensors", base.pipe.unet, seed=1,
                       key_prefix="lora_unet_nothing_like_")
    with pytest.raises(SettingsError, match=r"--lora=.*alien"):
        load(model="tiny", lora=str(alien))
    with pytest.raises(SettingsError, match=r"--lora=.*missing.safetensors.*no such file"):
        load(model="tiny", lora=str(tmp_path / "missing.safetensors"))


def test_lora_flag_syntax() -> None:
    assert parse_loras("a.safetensors, b.safetensors:0.5,c:d.pt:-1") == [
        ("a.safetensors", 1.0), ("b.safetensors", 0.5), ("c:d.pt", -1.0)
    ]
    assert Settings.from_sources(env={"BATCHSERVE_LORA": "x.safetensors:0.25"}).lora_specs() == [
        ("x.safetensors", 0.25)
    ]
    with pytest.raises(SettingsError, match=r"--lora.*scale must be"):
        Settings(lora="x.safetensors:99")
    with pytest.raises(SettingsError, match=r"--lora.*names no file"):
        Settings(lora=" , ")


# -- VAE -----------------------------------------------------------------------------------------

def test_vae_from_folder_or_single_file(base: DiffusionEngine, files: Files,
                                        tmp_path: Path) -> None:
    folder = load(model="tiny", vae=str(files.vae_folder))
    single = load(model="tiny", vae=str(files.vae_file))
    assert not same(one(folder), one(base))
    assert same(one(folder), one(single))
    assert single.info().to_dict()["vae"] == str(files.vae_file)
    bare = vae_single_file(folder.pipe.vae, tmp_path / "vae-bare.safetensors", prefix="")
    in_diffusers_layout = files.vae_folder / "diffusion_pytorch_model.safetensors"
    for file in (bare, in_diffusers_layout):
        assert same(one(load(model="tiny", vae=str(file))), one(folder)), file


def test_vae_of_another_shape_is_a_settings_error(base: DiffusionEngine, tmp_path: Path) -> None:
    eight = other_vae(base.pipe.vae, seed=1, latent_channels=8)
    eight.save_pretrained(tmp_path / "vae8")
    with pytest.raises(SettingsError, match=r"--vae=.*does not fit this model"):
        load(model="tiny", vae=str(tmp_path / "vae8"))
    with pytest.raises(SettingsError, match=r"--vae=.*no such file"):
        load(model="tiny", vae=str(tmp_path / "nope.safetensors"))


# -- clip skip -----------------------------------------------------------------------------------

def test_clip_skip_two_is_the_model_without_its_last_clip_layer(base: DiffusionEngine) -> None:
    """Web-UI numbering: --clip-skip 2 conditions on the penultimate layer (then the final layer
    norm), which is what a text encoder cut one layer short outputs. (diffusers' own
    `clip_skip` argument fails on transformers' flattened CLIPTextModel, so no reference there.)"""
    from transformers import CLIPTextModel

    skipped = load(model="tiny", clip_skip=2)
    image = one(skipped)
    assert not same(image, one(base))
    full = base.pipe.text_encoder
    config = full.config.to_dict() | {"num_hidden_layers": full.config.num_hidden_layers - 1}
    cut = CLIPTextModel(type(full.config)(**config))
    missing, _ = cut.load_state_dict(full.state_dict(), strict=False)
    assert not missing
    cut_engine = load(model="tiny")
    cut_engine.pipe.text_encoder = cut
    cut_engine.prompts.text_encoder = cut
    assert same(image, one(cut_engine))
    with pytest.raises(SettingsError, match=r"--clip-skip=3: .* only 2 layers"):
        load(model="tiny", clip_skip=3)


# -- the whole server ----------------------------------------------------------------------------

def test_server_runs_a_community_setup_and_lists_it(files: Files, tmp_path: Path) -> None:
    with running_server(
        "--model", str(files.single), "--model-config", str(files.folder),
        "--embeddings", str(files.embeddings), "--allow-pickle",
        "--lora", f"{files.lora}:0.5", "--vae", str(files.vae_file), "--clip-skip", "2",
        tmp_path=tmp_path,
    ) as server:
        info = httpx.get(server.url + "/v1/info").json()["engine"]
        reply = httpx.post(server.url + "/t2i", json={
            "prompt": "a red cube, Shiny", "negative_prompt": "EasyNeg", "width": 64,
            "height": 64, "inference_steps": 1, "seed": 1}, timeout=60)
        logs = server.logs()
    assert reply.status_code == 200 and reply.headers["content-type"] == "image/png"
    assert {e["token"] for e in info["embeddings"]} == {"EasyNeg", "Plain", "Shiny"}
    assert info["loras"][0]["scale"] == 0.5 and info["vae"] == str(files.vae_file)
    assert (info["long_prompts"], info["clip_skip"]) == ("chunk", 2)
    for line in ("embedding EasyNeg (2 vectors)", "lora ", "vae ", "clip skip 2"):
        assert line in logs


def test_server_with_a_bad_file_stops_with_one_clear_line(tmp_path: Path) -> None:
    server = ServerProcess("--model", "tiny", "--lora", str(tmp_path / "gone.safetensors"),
                           log=tmp_path / "server.log")
    try:
        code = server.proc.wait(120)
    finally:
        server.terminate()
    logs = (tmp_path / "server.log").read_text()
    assert code != 0
    assert "--lora=" in logs and "gone.safetensors" in logs and "no such file" in logs
    assert "Traceback" not in logs
