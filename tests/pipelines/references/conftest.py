import pytest

from tests.pipelines.references.presets import make_clip_preset, make_siglip_preset

PRESETS = ("siglip", "siglip_gemma", "clip")


@pytest.fixture(scope="session")
def presets(tmp_path_factory) -> dict[str, str]:
    """name -> a local keras-hub preset folder: SigLIP (SigLIP tokenizer), SigLIP with a Gemma tokenizer (SigLIP 2's
    text path), CLIP; tiny, random weights, 48 px (the test corpus's 32 px images are resized up)."""
    root = tmp_path_factory.mktemp("presets")
    return {
        "siglip": make_siglip_preset(str(root / "siglip")),
        "siglip_gemma": make_siglip_preset(str(root / "siglip_gemma"), tokenizer="gemma", seed=1),
        "clip": make_clip_preset(str(root / "clip")),
    }


@pytest.fixture(scope="session")
def scored_by_preset(presets, tiny_corpus, tmp_path_factory) -> dict[str, dict]:
    """name -> the run summary of the tiny corpus's web split scored by that preset through the Beam job."""
    from pipelines import score

    summaries = {}
    for name, preset in presets.items():
        output = str(tmp_path_factory.mktemp(f"scored_{name}") / "scored")
        summaries[name] = {
            **score.run(
                [
                    f"--input={tiny_corpus}/web/*.tar",
                    f"--output={output}",
                    f"--reference={preset}",
                    "--min_image_size=4",
                    "--inference_batch_size=64",
                ]
            ),
            "output": output,
        }
    return summaries
