from pathlib import Path

from google.protobuf import text_format

from inference import model_config_pb2 as mc
from modelplane.loadtest.scenarios import MAX_BATCH, model_specs, write_repository


def test_repository_has_each_model_with_a_triton_config(tmp_path: Path) -> None:
    specs = model_specs()
    paths = write_repository(tmp_path, specs)
    assert sorted(paths) == [
        "heavy_batched",
        "heavy_unbatched",
        "light_batched",
        "light_unbatched",
    ]
    for spec in specs:
        assert paths[spec.name] == tmp_path / spec.name / "1" / "model.onnx"
        config = text_format.Parse(
            (tmp_path / spec.name / "config.pbtxt").read_text(), mc.ModelConfig()
        )
        assert config.name == spec.name
        assert config.max_batch_size == MAX_BATCH
        assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
        # Batching off is the absence of the block, as in Triton.
        assert config.HasField("dynamic_batching") == spec.batching
        if spec.batching:
            assert list(config.dynamic_batching.preferred_batch_size) == list(spec.preferred)


def test_on_and_off_differ_only_in_batching() -> None:
    specs = {spec.name: spec for spec in model_specs()}
    for kind in ("light", "heavy"):
        on, off = specs[f"{kind}_batched"], specs[f"{kind}_unbatched"]
        assert (on.layers, on.instances) == (off.layers, off.instances)
        assert on.batching and not off.batching
