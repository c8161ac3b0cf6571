import pytest

from compressor import recipe
from compressor.errors import CompressorError


def test_every_shipped_recipe_loads():
    names = recipe.shipped()
    assert {"svd", "welore"} <= set(names)
    for name in names:
        assert recipe.load(name).stages


def test_ratio_override_and_bounds():
    assert recipe.load("welore", ratio=0.35).stages[0].config.ratio == 0.35
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(CompressorError, match="strictly between 0 and 1"):
            recipe.load("svd", ratio=bad)


@pytest.mark.parametrize(
    "text, message",
    [
        ("stages:\n  - method: svd\n    ratoi: 0.2\n", "unknown key 'ratoi'"),
        ("stages:\n  - method: svd\n    ratio: high\n", "key 'ratio' must be float"),
        ("stages:\n  - method: nope\n", "unknown method 'nope'"),
        ("stages: []\n", "non-empty list"),
        ("stages:\n  - method: svd\ncolour: red\n", "unknown key 'colour'"),
        ("calibration:\n  samples: many\nstages:\n  - method: svd\n", "key 'samples' must be int"),
        ("stages: [\n", "not valid YAML"),
    ],
)
def test_bad_recipes_name_key_and_file(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(CompressorError, match=message) as err:
        recipe.load(str(path))
    assert "\n" not in str(err.value)
    if "YAML" not in message:
        assert str(path) in str(err.value)


def test_unknown_recipe_name_lists_shipped():
    with pytest.raises(CompressorError, match="shipped recipes: .*welore"):
        recipe.load("no-such-recipe")


def test_to_dict_round_trips():
    rec = recipe.load("welore", ratio=0.25)
    again = recipe.from_dict(rec.to_dict())
    assert again.to_dict() == rec.to_dict()


@pytest.mark.parametrize("name", recipe.shipped())
def test_every_shipped_recipe_compresses_and_reloads(name, tmp_path):
    """Each shipped recipe, shrunk to a tiny llama's widths (group size 32), runs end to end and
    its export reloads with the logits it had in memory."""
    import torch
    from conftest import byte_tokenizer, tiny_model

    import compressor
    from compressor.api import compress

    data = recipe.load(name).to_dict()
    for stage in data["stages"]:
        if "group_size" in stage:
            stage["group_size"] = 32
        if stage["method"] == "eora" and stage.get("refine"):
            stage["refine"] = 1
    shrunk = recipe.from_dict(data, source=name)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    result = compress(tiny_model("llama"), shrunk, tmp_path / "out", tokenizer=byte_tokenizer(), samples=4, seq_len=32, device="cpu")
    with torch.no_grad():
        ours = result.model(ids).logits
        again = compressor.load(tmp_path / "out")(ids).logits
    assert torch.isfinite(ours).all()
    assert torch.allclose(ours, again, atol=1e-4)
