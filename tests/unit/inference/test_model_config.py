"""config.pbtxt → ModelPlan, and the execution provider choice."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelplane.kernel.errors import InvalidArgument
from modelplane.services.inference.model_config import Defaults, plan, selected_versions
from modelplane.services.inference.runtime import CPU, CUDA, choose_providers

DEFAULTS = Defaults(max_batch_size=32, max_queue_rows=100, instance_count=1, thread_budget=4)


def model_dir(tmp_path: Path, config: str | None) -> Path:
    directory = tmp_path / "m"
    directory.mkdir()
    if config is not None:
        (directory / "config.pbtxt").write_text(config)
    return directory


def test_no_config_means_batching_on_with_the_defaults(tmp_path):
    result = plan(model_dir(tmp_path, None), DEFAULTS)
    assert result.max_batch_size is None  # decided from the model's first dimension
    assert result.policy.enabled
    assert result.policy.max_batch_size == 32
    assert result.policy.max_queue_rows == 100
    assert result.instance_count == 1
    assert result.intra_op_threads == 4
    assert result.execution_provider == "auto"


def test_a_config_without_dynamic_batching_turns_batching_off(tmp_path):
    result = plan(model_dir(tmp_path, "max_batch_size: 16"), DEFAULTS)
    assert result.max_batch_size == 16
    assert not result.policy.enabled


def test_the_triton_keys_of_a_batching_config_are_honoured(tmp_path):
    config = """
        name: "m"
        max_batch_size: 64
        dynamic_batching {
          preferred_batch_size: [ 8, 32 ]
          max_queue_delay_microseconds: 500
          default_queue_policy { max_queue_size: 256 }
        }
        instance_group [ { count: 2 kind: KIND_CPU } ]
        parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
    """
    result = plan(model_dir(tmp_path, config), DEFAULTS)
    assert result.policy.enabled
    assert result.policy.preferred_batch_sizes == (8, 32)
    assert result.policy.target_rows == 32
    assert result.policy.max_queue_delay_s == pytest.approx(0.0005)
    assert result.policy.max_queue_rows == 256
    assert result.instance_count == 2
    assert result.execution_provider == "cpu"
    assert result.intra_op_threads == 1


def test_instances_split_the_thread_budget(tmp_path):
    result = plan(model_dir(tmp_path, "instance_group [ { count: 2 } ]"), DEFAULTS)
    assert result.intra_op_threads == 2


def test_gpu_instances_or_a_parameter_ask_for_cuda(tmp_path):
    gpu = plan(model_dir(tmp_path, "instance_group [ { kind: KIND_GPU } ]"), DEFAULTS)
    assert gpu.execution_provider == "cuda"
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.pbtxt").write_text(
        'parameters { key: "execution_provider" value: { string_value: "cpu" } }'
    )
    assert plan(other, DEFAULTS).execution_provider == "cpu"


@pytest.mark.parametrize(
    "config, message",
    [
        ("max_batch_size: 8 dynamic_batching { preferred_batch_size: [ 16 ] }", "preferred"),
        ('name: "other"', "differs from the model"),
        ("max_batch_size: oops", "config.pbtxt"),
        ('parameters { key: "intra_op_thread_count" value: { string_value: "x" } }', "integer"),
    ],
)
def test_a_bad_config_is_rejected_with_the_reason(tmp_path, config, message):
    with pytest.raises(InvalidArgument, match=message):
        plan(model_dir(tmp_path, config), DEFAULTS)


def test_version_policies(tmp_path):
    from inference import model_config_pb2 as mc

    config = mc.ModelConfig()
    assert selected_versions(config, [3, 1, 2]) == [1, 2, 3]
    config.version_policy.latest.num_versions = 1
    assert selected_versions(config, [3, 1, 2]) == [3]
    config.version_policy.specific.versions[:] = [1, 3]
    assert selected_versions(config, [3, 1, 2]) == [1, 3]


@pytest.mark.parametrize(
    "requested, available, providers",
    [
        ("auto", [CUDA, CPU], (CUDA, CPU)),
        ("auto", [CPU], (CPU,)),
        ("cuda", [CUDA, CPU], (CUDA, CPU)),
        ("gpu", [CUDA, CPU], (CUDA, CPU)),
        ("cuda", [CPU], (CPU,)),  # asked for but absent: CPU, with the reason logged
        ("cpu", [CUDA, CPU], (CPU,)),
        ("CUDA", [CUDA, CPU], (CUDA, CPU)),
    ],
)
def test_the_provider_choice(requested, available, providers):
    assert choose_providers(requested, available).providers == providers


def test_a_cuda_request_without_cuda_says_why():
    assert "not available" in choose_providers("cuda", [CPU]).reason


def test_an_unknown_provider_is_rejected():
    with pytest.raises(InvalidArgument, match="tensorrt"):
        choose_providers("tensorrt", [CPU])
