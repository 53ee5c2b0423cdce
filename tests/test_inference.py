"""Inference: MAC counts, latency measurement, ONNX / int8 export, benchmark report, Pareto front, CLI."""

import copy
import dataclasses
import csv
import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path

import mlflow
import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from cifar_exp import deployment, inference, tracking
from cifar_exp.config import BenchmarkConfig, DataConfig, ExperimentConfig, TrackingConfig, TrainConfig
from cifar_exp.deployment import _benchmark_data
from cifar_exp.data import load_dataset, load_splits, load_test_set
from cifar_exp.errors import ConfigError, DataError, ExportError, TrackingError
from cifar_exp.reports import pareto_front
from cifar_exp.train import build_classifier, fit
from conftest import CLASSES, write_image_folder

# Fast settings for every measurement here: speed targets live in benchmarks/, not in tests.
QUICK = dict(repeats=3, seconds_per_repeat=0.01, warmup_seconds=0.0)
QUICK_ARGS = ["--repeats", "3", "--seconds-per-repeat", "0.01", "--warmup-seconds", "0",
              "--batch-sizes", "1,4", "--calibration-images", "64", "--floor-matmul-size", "256"]
FLOOR = dict(floor_matmul_size=256)


def run_cli(*args):
    from cifar_exp.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def seed_model(seed=0):
    torch.manual_seed(seed)
    return build_classifier(TrainConfig(model="seed"), 10).eval()


# --------------------------------------------------------------------------------------------------
# Model facts


@pytest.mark.parametrize(("name", "macs"), [
    # seed: MaxPool2d(3) takes 32 -> 10 -> 3 -> 1; a 3x3 conv costs H x W x C_out x (C_in x 9) MACs.
    #   conv1 32*32*64*(3*9)   = 1,769,472
    #   conv2 10*10*64*(64*9)  = 3,686,400
    #   conv3  3* 3*64*(64*9)  =   331,776
    #   fc1   64*1024          =    65,536
    #   fc2   1024*10          =    10,240   -> 5,863,424
    ("seed", 5_863_424),
    # seed-wide: MaxPool2d(2) takes 32 -> 16 -> 8 -> 4.
    #   conv1 32*32*64*27 = 1,769,472; conv2 16*16*64*576 = 9,437,184; conv3 8*8*64*576 = 2,359,296;
    #   fc1 1024*1024 = 1,048,576; fc2 1024*10 = 10,240                  -> 14,624,768
    ("seed-wide", 14_624_768),
])
def test_mac_count_matches_the_analytic_value(name, macs):
    assert inference.count_macs(build_classifier(TrainConfig(model=name), 10)) == macs


@pytest.mark.parametrize("output", [lambda x: x.mean((1, 2, 3)), lambda x: x.flatten(1)[:, :1]])
def test_check_classifier_rejects_non_classifiers(output):
    class NotAClassifier(torch.nn.Module):
        def forward(self, images):
            return output(images)

    with pytest.raises(TrackingError, match="model toy is not an image classifier"):
        inference.check_classifier(NotAClassifier(), "toy")
    assert inference.check_classifier(seed_model(), "seed") == 10


def test_check_classifier_rejects_other_input_sizes():
    wrong_input = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 64 * 64, 10))
    with pytest.raises(TrackingError, match="does not accept \\(B, 3, 32, 32\\) images"):
        inference.check_classifier(wrong_input, "big-images")


def test_check_classifier_rejects_a_fixed_batch_size():
    class BatchOfTwo(torch.nn.Module):  # as a model exported without a dynamic batch axis behaves
        def forward(self, images):
            if len(images) != 2:
                raise RuntimeError(f"expected batch 2, got {len(images)}")
            return images.flatten(1)[:, :10]

    with pytest.raises(TrackingError, match="model fixed does not accept .* images: expected batch 2, got 1"):
        inference.check_classifier(BatchOfTwo(), "fixed")


# --------------------------------------------------------------------------------------------------
# Timing


def test_time_calls_measures_a_known_duration():
    stats = inference.time_calls(lambda: time.sleep(0.002), batch_size=4, threads=1, repeats=3,
                                 seconds_per_repeat=0.02, warmup_seconds=0.0)
    assert len(stats.repeat_p50_ms) == 3 and stats.calls >= 3 * inference.MIN_CALLS
    # The median resists a stalled call on a loaded machine; p99 of ~30 calls is their slowest.
    assert 2.0 <= stats.p50_ms < 50 and stats.p50_ms <= stats.p90_ms <= stats.p99_ms
    assert stats.images_per_second == pytest.approx(4 / (stats.mean_ms / 1e3), rel=1e-6)
    p50s = sorted(stats.repeat_p50_ms)
    assert stats.spread == pytest.approx((p50s[-1] - p50s[0]) / p50s[1])


@pytest.mark.parametrize(("backend", "autocast_dtype"), [("pytorch-fp32", None), ("pytorch-bf16", torch.bfloat16)])
def test_pytorch_backends_time_and_predict_with_the_threads_and_precision_asked_for(backend, autocast_dtype):
    seen = set()

    class Probe(torch.nn.Linear):
        def forward(self, images):
            autocast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
            seen.add((torch.get_num_threads(), autocast))
            return super().forward(images.flatten(1))

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runner = inference._TorchBackend(backend, Probe(3 * 32 * 32, 10), torch.device("cpu"), threads=1)
        runner.latency(1, repeats=1, seconds_per_repeat=0.01, warmup_seconds=0.0)
        runner.predict(np.zeros((2, 3, 32, 32), np.float32))
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(before)
    assert seen == {(1, autocast_dtype)}


@pytest.mark.parametrize("given", [torch.contiguous_format, torch.channels_last])
def test_pytorch_backends_time_the_model_as_it_ships_whatever_layout_it_came_in(given):
    # A model from training (channels_last), from the registry or from a builder (either) must time
    # alike: each is timed channels_last, as it ships, and the caller's model is left as it was.
    layouts = set()

    class Probe(torch.nn.Conv2d):
        def forward(self, images):
            layouts.add(self.weight.is_contiguous(memory_format=torch.channels_last))
            return super().forward(images).mean((2, 3))

    model = Probe(3, 10, 3).to(memory_format=given)
    runner = inference._TorchBackend("pytorch-fp32", model, torch.device("cpu"), threads=1)
    runner.latency(1, repeats=1, seconds_per_repeat=0.01, warmup_seconds=0.0)
    assert layouts == {True}
    assert model.weight.is_contiguous(memory_format=given)


def test_latency_statistics_of_known_call_times():
    # Two repeats of 5 calls (ms); numpy's linear-interpolation percentiles of all 10 by hand.
    stats = inference.summarize_times([[1, 2, 3, 4, 100], [2, 2, 3, 5, 7]], batch_size=8, threads=2)
    # sorted: 1 2 2 2 3 3 4 5 7 100 -> p50 between 3 and 3; p90 at rank 8.1: 7 + 0.1 * 93; p99 at 8.91
    assert (stats.p50_ms, stats.p90_ms, stats.p99_ms) == pytest.approx((3.0, 16.3, 91.63))
    assert stats.mean_ms == pytest.approx(12.9) and stats.calls == 10
    assert stats.repeat_p50_ms == (3.0, 3.0)
    assert stats.images_per_second == pytest.approx(8 * 10 / 0.129)  # 80 images in 129 ms
    skewed = inference.summarize_times([[1, 1, 9], [2, 2, 2], [4, 4, 4]], batch_size=1, threads=1)
    assert skewed.repeat_p50_ms == (1.0, 2.0, 4.0) and skewed.spread == pytest.approx((4 - 1) / 2)


def test_logit_agreement_counts_each_disagreement():
    reference = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 2.0], [0.0, 0.0, 1.0]])
    converted = reference.copy()
    converted[1] = [0.0, 2.0, 2.5]  # another top-1, and the largest difference: 1.5
    converted[3, 0] = 0.5
    check = inference.compare_logits(reference, converted.astype(np.float32), labels=np.array([0, 2, 2, 1]))
    assert check.images == 4 and check.top1_agreement == 0.75
    assert check.max_abs_logit_diff == pytest.approx(1.5)
    assert (check.accuracy, check.reference_accuracy) == (0.75, 0.5)


@pytest.mark.parametrize("backend", ["pytorch-fp32", "onnxruntime-fp32"])
def test_measure_latency_of_a_fresh_model(backend):
    stats = inference.measure_latency(seed_model(), batch_size=2, threads=1, backend=backend, **QUICK)
    assert stats.batch_size == 2 and stats.threads == 1
    assert 0 < stats.p50_ms <= stats.p99_ms
    assert stats.calls >= 3 * inference.MIN_CALLS and len(stats.repeat_p50_ms) == 3


def test_measure_latency_needs_calibration_for_int8():
    with pytest.raises(ConfigError, match="measure_latency cannot measure backend 'onnxruntime-int8'"):
        inference.measure_latency(seed_model(), backend="onnxruntime-int8")


@pytest.mark.parametrize("batch_size", [0, -3])
def test_measure_latency_rejects_bad_batch_sizes(batch_size):
    with pytest.raises(ConfigError, match=f"batch size must be >= 1, got {batch_size}"):
        inference.measure_latency(seed_model(), batch_size=batch_size)


@pytest.mark.parametrize(("batch_sizes", "message"), [
    ("1,0,8", "batch-sizes must be comma-separated positive integers, got 0 in '1,0,8'"),
    ("1,-2", "batch-sizes must be comma-separated positive integers, got -2 in '1,-2'"),
    ("1,x", "batch-sizes must be comma-separated positive integers, got '1,x'"),
])
def test_benchmark_config_rejects_bad_batch_sizes(batch_sizes, message):
    with pytest.raises(ConfigError, match=message.replace("(", "\\(")):
        BenchmarkConfig(batch_sizes=batch_sizes)


def test_benchmark_config_rejects_unknown_backends():
    with pytest.raises(ConfigError, match="unknown backend 'tensorrt'"):
        BenchmarkConfig(backends="pytorch-fp32,tensorrt")
    assert BenchmarkConfig(backends="onnxruntime-int8, pytorch-fp32").backend_names() == (
        "onnxruntime-int8", "pytorch-fp32")



def test_an_empty_model_uri_is_none():
    # The MLproject's benchmark entry point passes --model-uri "" for "the untrained --model".
    assert BenchmarkConfig(model_uri="").model_uri is None and BenchmarkConfig(model_uri=" ").model_uri is None
    assert BenchmarkConfig(model_uri="runs:/abc/model").model_uri == "runs:/abc/model"

# --------------------------------------------------------------------------------------------------
# ONNX and int8


@pytest.fixture(scope="module")
def seed_onnx(tmp_path_factory):
    """An untrained seed model and its ONNX export: (model, path)."""
    model = seed_model()
    return model, inference.export_onnx(model, tmp_path_factory.mktemp("onnx") / "seed.onnx")


def test_onnx_export_agrees_with_pytorch_on_random_inputs(seed_onnx):
    model, path = seed_onnx
    graph_input = onnx.load(str(path)).graph.input[0]
    assert graph_input.name == "images"
    assert graph_input.type.tensor_type.shape.dim[0].dim_param  # the batch axis is symbolic
    session = inference.onnx_session(path, threads=1)
    for batch_size in (1, 7, 300):
        images = np.random.default_rng(batch_size).random((batch_size, 3, 32, 32), dtype=np.float32)
        with torch.inference_mode():
            expected = model(torch.from_numpy(images)).numpy()
        check = inference.compare_logits(expected, session.run(None, {"images": images})[0])
        assert check.top1_agreement == 1.0
        assert check.max_abs_logit_diff < 1e-4
        assert check.images == batch_size


def test_a_channels_last_model_exports_without_shape_arithmetic(tmp_path):
    # Exported from channels_last weights, resnet8's global pooling traced into Shape, Gather, Range,
    # Squeeze and Unsqueeze nodes (34 instead of 24): ONNX has no layout, so the export is contiguous.
    model = build_classifier(TrainConfig(model="resnet8"), 10).eval().to(memory_format=torch.channels_last)
    path = inference.export_onnx(model, tmp_path / "resnet8.onnx")
    operators = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert not operators & {"Shape", "Gather", "Range"}, operators
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters() if p.dim() == 4)


def test_the_timed_onnx_call_computes_the_logits_into_its_bound_buffer(seed_onnx):
    model, path = seed_onnx
    backend = inference._OnnxBackend("onnxruntime-fp32", path, threads=1)
    for batch_size in (1, 5):
        # timed_call's input: the same generator and shape as inside it
        images = np.random.default_rng(0).random((batch_size, 3, 32, 32), dtype=np.float32)
        with torch.inference_mode():
            expected = model(torch.from_numpy(images)).numpy()
        with backend.timed_call(batch_size) as (call, synchronize):
            first = call()
            first[:] = np.nan  # the next call must write every logit again
            logits = call()
        assert synchronize is None and logits is first and logits.shape == (batch_size, 10)
        np.testing.assert_allclose(logits, expected, atol=1e-4)


@pytest.fixture(scope="module")
def tiny_trained(tiny_data, tmp_path_factory):
    """A seed model trained a few epochs on the tiny learnable set: (model, splits)."""
    cfg = DataConfig(data_dir=str(tiny_data), val_size=50, cache_dir=str(tmp_path_factory.mktemp("cache")))
    splits = load_splits(cfg)
    result = fit(TrainConfig(epochs=4, batch_size=32, lr=0.05, amp=False, eval_batch_size=100), splits)
    return result.model.cpu(), splits


def test_int8_export_keeps_the_accuracy(tiny_trained, tmp_path):
    model, splits = tiny_trained
    calibration = inference.calibration_images(splits.train, 200)
    assert calibration.shape == (200, 3, 32, 32) and calibration.dtype == np.float32
    assert 0 <= calibration.min() and calibration.max() <= 1
    result = inference.export_and_verify(model, tmp_path / "out", test=splits.test, calibration=calibration,
                                         threads=1)
    assert result.onnx_path.is_file() and result.int8_path.is_file()
    fp32, int8 = result.onnx_check, result.int8_check
    assert fp32.top1_agreement == 1.0 and fp32.max_abs_logit_diff < 1e-4
    assert fp32.accuracy == fp32.reference_accuracy > 0.5  # the model learned something to keep
    assert abs(int8.accuracy - fp32.accuracy) <= 0.05  # 5 of the 100 test images
    assert int8.top1_agreement >= 0.9
    # int8 weights are a quarter of fp32's, plus fp32 biases and scales, and the fp32 first conv.
    assert result.weight_bytes_int8 < 0.4 * result.weight_bytes_fp32
    metrics = result.metrics()
    assert metrics["onnxruntime-int8/test_accuracy"] == int8.accuracy
    assert metrics["onnxruntime-fp32/top1_agreement"] == 1.0


def test_a_failed_export_leaves_the_folder_as_it_was(tiny_trained, tmp_path, monkeypatch):
    model, splits = tiny_trained
    out = tmp_path / "out"
    calibration = inference.calibration_images(splits.train, 50)
    inference.export_and_verify(model, out, test=splits.test, calibration=calibration, threads=1)
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    assert sorted(before) == ["model.int8.onnx", "model.onnx"]  # no staging folder left behind

    monkeypatch.setattr(inference, "FP32_LOGIT_ATOL", -1.0)  # every export now fails its check
    with pytest.raises(ExportError, match="the ONNX export disagrees with the PyTorch model"):
        inference.export_and_verify(build_classifier(TrainConfig(), 10), out, test=splits.test, threads=1)
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    with pytest.raises(ExportError):
        inference.export_and_verify(model, tmp_path / "new" / "deeper", test=splits.test, threads=1)
    assert not (tmp_path / "new").exists()  # made for the export, removed with it, parents included

    monkeypatch.undo()
    # fp32 only: the int8 file of the earlier export would sit beside a model it was not made from
    result = inference.export_and_verify(build_classifier(TrainConfig(), 10), out, test=splits.test, threads=1)
    assert result.int8_path is None and [path.name for path in out.iterdir()] == ["model.onnx"]
    assert result.onnx_path == out / "model.onnx" and out.joinpath("model.onnx").read_bytes() != before["model.onnx"]


def test_an_export_interrupted_as_it_is_published_still_lands(tiny_trained, tmp_path, project_signal_handlers):
    # Ctrl-C while the files are logged into the model's run: the run then records the export, so the
    # files it names must reach the output folder too (the signal is raised once they have).
    model, splits = tiny_trained

    def logged_as_ctrl_c_came(staged):
        os.kill(os.getpid(), signal.SIGINT)
        return []

    with pytest.raises(KeyboardInterrupt):
        inference.export_and_verify(model, tmp_path / "out", test=splits.test, threads=1,
                                    publish=logged_as_ctrl_c_came)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.onnx"]


def test_export_allows_rounding_that_scales_with_large_logits(tiny_trained, tmp_path):
    # A diverged model's logits reach ~1e6, where one float32 step is 0.06: the same rounding as at
    # logits of 10, not a disagreement. An absolute tolerance of 1e-3 refused such files.
    model, splits = tiny_trained
    model = copy.deepcopy(model)
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        head.weight.mul_(1e5)
        head.bias.mul_(1e5)
    result = inference.export_and_verify(model, tmp_path / "out", test=splits.test, threads=1)
    check = result.onnx_check
    largest = float(np.abs(inference._TorchBackend("pytorch-fp32", model, torch.device("cpu"), 1)
                           .predict(inference.images_as_float(splits.test))).max())
    assert largest > 1e5 and check.top1_agreement == 1.0
    assert inference.FP32_LOGIT_ATOL < check.max_abs_logit_diff  # the old, absolute check would refuse it
    assert check.max_abs_logit_diff <= inference.FP32_LOGIT_ATOL + inference.FP32_LOGIT_RTOL * largest


def test_a_model_in_training_mode_is_measured_as_it_ships(tiny_trained, tmp_path):
    # BatchNorm in training mode would use batch statistics (and update its running ones): the
    # reference logits, MAC count and shape check must all use eval mode, and leave the model as it was.
    _, splits = tiny_trained
    model = build_classifier(TrainConfig(model="seed-bn"), 10)
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    assert model.training
    inference.check_classifier(model, "seed-bn")
    inference.count_macs(model)
    result = inference.export_and_verify(model, tmp_path / "out", test=splits.test, threads=1)
    assert result.onnx_check.top1_agreement == 1.0 and result.onnx_check.max_abs_logit_diff < 1e-4
    assert model.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_calibration_takes_at_most_the_training_set(tiny_trained):
    _, splits = tiny_trained
    assert len(inference.calibration_images(splits.train, 10_000)) == len(splits.train)
    with pytest.raises(ConfigError, match="calibration-images must be >= 1, got 0"):
        inference.calibration_images(splits.train, 0)


def test_int8_preparation_pads_the_first_conv_exactly(seed_onnx, tmp_path):
    # Only the first conv's 3 input channels need a 4th, zero channel; its output must not change.
    model, path = seed_onnx
    graph = onnx.load(str(path))
    padded = inference._pad_conv_input_channels(graph)
    convs = [n for n in graph.graph.node if n.op_type == "Conv"]
    assert padded == [convs[0].name]
    weights = {t.name: tuple(t.dims) for t in graph.graph.initializer}
    assert weights[convs[0].input[1]] == (64, 4, 3, 3) and weights[convs[1].input[1]] == (64, 64, 3, 3)
    onnx.save(graph, str(tmp_path / "padded.onnx"))
    images = np.random.default_rng(0).random((5, 3, 32, 32), dtype=np.float32)
    before = inference.onnx_session(path, 1).run(None, {"images": images})[0]
    after = inference.onnx_session(tmp_path / "padded.onnx", 1).run(None, {"images": images})[0]
    assert np.abs(after - before).max() < 1e-5


def test_int8_preparation_runs_the_linear_head_in_nhwc_exactly(seed_onnx, tmp_path):
    # (B, 64, 1, 1) -> Flatten -> Gemm -> Relu -> Gemm becomes Conv1x1 -> Relu -> Transpose -> Flatten -> Gemm.
    model, path = seed_onnx
    graph = onnx.load(str(path))
    assert inference._linear_head_as_pointwise_convs(graph) == 1
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("Gemm") == 1 and "Reshape" not in ops
    assert ops[-5:] == ["Conv", "Relu", "Transpose", "Flatten", "Gemm"]
    onnx.save(graph, str(tmp_path / "head.onnx"))
    for batch_size in (1, 5):
        images = np.random.default_rng(batch_size).random((batch_size, 3, 32, 32), dtype=np.float32)
        before = inference.onnx_session(path, 1).run(None, {"images": images})[0]
        after = inference.onnx_session(tmp_path / "head.onnx", 1).run(None, {"images": images})[0]
        assert after.shape == (batch_size, 10)
        assert np.abs(after - before).max() < 1e-5


def test_int8_seed_runs_nhwc_from_the_first_conv_to_float_logits(seed_onnx, tmp_path):
    # After ONNX Runtime's layout pass the int8 seed has one Transpose (the image to NHWC): the head's
    # explicit NHWC Transpose cancelled the one the runtime would add. It ends in a QGemm that writes
    # the logits in float: no DequantizeLinear, and more than the 256 values 8-bit logits could take.
    import onnxruntime as ort

    _, path = seed_onnx
    calibration = np.random.default_rng(0).random((64, 3, 32, 32), dtype=np.float32)
    int8 = inference.quantize_int8(path, tmp_path / "model.int8.onnx", calibration)
    assert [n.op_type for n in onnx.load(str(int8)).graph.node][-1] == "Gemm"
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(int8), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimised.onnx")).graph.node]
    assert ops.count("Transpose") == 1 and ops[-2:] == ["Flatten", "QGemm"] and "DequantizeLinear" not in ops
    logits = inference.onnx_session(int8, 1).run(None, {"images": calibration})[0]  # (64, 10)
    assert len(np.unique(logits)) > 256


@pytest.mark.parametrize("name", ["pico", "pico-sep", "resnet8"])
def test_int8_one_layer_heads_write_float_logits(name, tmp_path):
    # Their head runs as a 1x1 conv, then Transpose and Flatten, each of the three followed by a
    # quantise-dequantise pair: 8-bit logits, where close classes tie. The pairs go, and the conv
    # computes the logits in float from the int8 pooled features.
    from cifar_exp.config import recipe_config
    from cifar_exp.train import build_shipped_classifier

    torch.manual_seed(0)
    path = inference.export_onnx(build_shipped_classifier(recipe_config("pico", model=name), 10).eval(),
                                 tmp_path / "model.onnx")
    calibration = np.random.default_rng(0).random((64, 3, 32, 32), dtype=np.float32)
    int8 = inference.quantize_int8(path, tmp_path / "model.int8.onnx", calibration)
    nodes = onnx.load(str(int8)).graph.node
    assert [n.op_type for n in nodes][-3:] == ["Conv", "Transpose", "Flatten"]
    assert [n.op_type for n in nodes][-5:-3] == ["QuantizeLinear", "DequantizeLinear"]  # the pooled features'
    logits = inference.onnx_session(int8, 1).run(None, {"images": calibration})[0]  # (64, 10)
    reference = inference.onnx_session(path, 1).run(None, {"images": calibration})[0]
    assert len(np.unique(logits)) > 256  # 8-bit logits take at most 256 values
    # Random weights give small logits (about 0.2 apart); measured 5e-7 to 1e-3 from fp32's.
    assert np.abs(logits - reference).max() < 0.02 * np.abs(reference).max()
    assert (logits.argmax(1) == reference.argmax(1)).mean() >= 0.9


@pytest.mark.parametrize(("mean", "std"), [(0.5, 0.5), (0.25, 0.2)])
def test_int8_model_quantises_the_raw_image_into_the_normalised_one(mean, std, tmp_path):
    # No Sub/Div left: the first QuantizeLinear reads the image, and what its DequantizeLinear hands
    # the first conv is (image - mean) / std to within half a quantisation step.
    torch.manual_seed(0)
    model = build_classifier(TrainConfig(model="seed", norm_mean=mean, norm_std=std), 10).eval()
    fp32 = inference.export_onnx(model, tmp_path / "model.onnx")
    calibration = np.random.default_rng(0).random((64, 3, 32, 32), dtype=np.float32)
    int8 = onnx.load(str(inference.quantize_int8(fp32, tmp_path / "model.int8.onnx", calibration)))
    ops = [n.op_type for n in int8.graph.node]
    assert "Sub" not in ops and "Div" not in ops
    pad = int8.graph.node[ops.index("Pad")]
    assert pad.input[0] == "images"
    quantize = next(n for n in int8.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == pad.output[0])
    dequantize = next(n for n in int8.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == quantize.output[0])
    step = float(inference._initializer_value(int8.graph, dequantize.input[1]))
    assert step == pytest.approx(1 / std / 255, rel=0.02)  # as fine as a calibrated 8-bit range of [0, 1]
    del int8.graph.output[:]
    int8.graph.output.append(onnx.helper.make_tensor_value_info(dequantize.output[0], onnx.TensorProto.FLOAT, None))
    onnx.save(int8, str(tmp_path / "input.onnx"))
    images = np.random.default_rng(1).random((8, 3, 32, 32), dtype=np.float32)
    images[0, 0, 0, :2] = [0.0, 1.0]  # both ends of the pixel range
    seen = inference.onnx_session(tmp_path / "input.onnx", 1).run(None, {"images": images})[0]
    assert seen.shape == (8, 4, 32, 32)  # the zero-weight 4th channel added for VNNI
    assert np.abs(seen[:, :3] - (images - mean) / std).max() <= step / 2 + 1e-6
    assert np.abs(seen[:, 3]).max() <= step / 2 + 1e-6  # padded with 0 in normalised units, as before


def test_int8_keeps_a_normalisation_it_cannot_fold(tmp_path):
    # A mean of 1.5 puts normalised pixels below the range a uint8 zero point of 0 can hold.
    torch.manual_seed(0)
    model = build_classifier(TrainConfig(model="seed", norm_mean=1.5, norm_std=0.5), 10).eval()
    fp32 = inference.export_onnx(model, tmp_path / "model.onnx")
    calibration = np.random.default_rng(0).random((64, 3, 32, 32), dtype=np.float32)
    int8 = inference.quantize_int8(fp32, tmp_path / "model.int8.onnx", calibration)
    ops = [n.op_type for n in onnx.load(str(int8)).graph.node]
    assert "Sub" in ops and "Div" in ops
    images = calibration[:16]
    check = inference.compare_logits(inference.onnx_session(fp32, 1).run(None, {"images": images})[0],
                                     inference.onnx_session(int8, 1).run(None, {"images": images})[0])
    assert check.top1_agreement >= 0.9


def _linear_head(trans_b=1, bias_shape=(4,), shared_weight=False, layers=2):
    """(B, 8, 1, 1) -> Flatten -> Gemm(W, b) [-> Relu -> Gemm(W2, b2)] as an ONNX model; with
    ``shared_weight`` another node reads W too."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((4, 8) if trans_b else (8, 4)).astype(np.float32)
    nodes = [helper.make_node("Flatten", ["x"], ["flat"], axis=1),
             helper.make_node("Gemm", ["flat", "w", "b"], ["h"], transB=trans_b)]
    initializers = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.ones(bias_shape, np.float32), "b")]
    if layers == 2:
        nodes += [helper.make_node("Relu", ["h"], ["r"]), helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], transB=1)]
        initializers += [numpy_helper.from_array(rng.standard_normal((3, 4)).astype(np.float32), "w2"),
                         numpy_helper.from_array(np.zeros(3, np.float32), "b2")]
    outputs = [helper.make_tensor_value_info("y" if layers == 2 else "h", TensorProto.FLOAT, ["batch", 3 if layers == 2 else 4])]
    if shared_weight:
        nodes.append(helper.make_node("Identity", ["w"], ["w_copy"]))
        outputs.append(helper.make_tensor_value_info("w_copy", TensorProto.FLOAT, list(weight.shape)))
    graph = helper.make_graph(
        nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8, 1, 1])], outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run_onnx(model, x):
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize(("head", "moved"), [
    (dict(), 1),
    (dict(trans_b=0), 0),  # W stored (C, N): not the layout a conv weight takes as it is
    (dict(bias_shape=(1,)), 0),  # a broadcast bias: Conv needs one per output channel
    (dict(shared_weight=True), 0),  # the weight is read by another node too
])
def test_linear_head_rewrite_takes_only_plain_linear_layers(head, moved):
    model = _linear_head(**head)
    x = np.random.default_rng(1).standard_normal((2, 8, 1, 1)).astype(np.float32)
    before = _run_onnx(model, x)
    assert inference._linear_head_as_pointwise_convs(model) == moved
    assert [n.op_type for n in model.graph.node].count("Gemm") == 2 - moved
    assert np.abs(_run_onnx(model, x) - before).max() < 1e-5


def test_a_one_layer_head_becomes_a_1x1_conv():
    # Its pooled input then stays int8 (a conv reads it).
    model = _linear_head(layers=1)
    x = np.random.default_rng(1).standard_normal((2, 8, 1, 1)).astype(np.float32)
    before = _run_onnx(model, x)
    assert inference._linear_head_as_pointwise_convs(model) == 1
    assert [n.op_type for n in model.graph.node] == ["Conv", "Transpose", "Flatten"]
    assert np.abs(_run_onnx(model, x) - before).max() < 1e-5


def test_relu_runs_before_max_pool_in_the_onnx_file(seed_onnx):
    # PyTorch's seed pools first; the ONNX file applies ReLU first (same values, fuses with the conv).
    _, path = seed_onnx
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("Conv") == 3 and "MaxPool" in ops
    assert [ops[i + 1] for i, op in enumerate(ops) if op == "Conv"] == ["Relu"] * 3


def test_onnx_convs_skip_the_rows_their_pool_never_reads(seed_onnx):
    # MaxPool2d(3) reads rows 0-29 of conv1's 32 and 0-8 of conv2's 10: one row and column less of
    # end padding computes 31 and 9 (the values the pool reads are the same); conv3's 3 are all read.
    model, path = seed_onnx
    graph = onnx.load(str(path))
    convs = [n for n in graph.graph.node if n.op_type == "Conv"]
    assert [list(next(a.ints for a in n.attribute if a.name == "pads")) for n in convs] == [
        [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    onnx.shape_inference.infer_shapes(graph, strict_mode=True)  # no shape recorded from before the trim
    images = torch.rand(3, 3, 32, 32)
    onnx_logits = inference.onnx_session(path, 1).run(None, {"images": images.numpy()})[0]
    with torch.no_grad():
        assert np.abs(onnx_logits - model(images).numpy()).max() < 1e-5


class _ConvPool(torch.nn.Module):
    def __init__(self, pool: torch.nn.Module, side_branch: bool = False) -> None:
        super().__init__()
        self.conv, self.pool, self.side_branch = torch.nn.Conv2d(3, 4, 3, padding=1), pool, side_branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)  # (B, 4, 7, 7)
        pooled = self.pool(y).flatten(1)
        return torch.cat([pooled, y.mean((2, 3))], 1) if self.side_branch else pooled


@pytest.mark.parametrize(("pool", "side_branch", "end_pads"), [
    (torch.nn.MaxPool2d(2), False, [0, 0]),  # reads 6 of 7 rows
    (torch.nn.MaxPool2d(2, stride=1), False, [1, 1]),  # overlapping windows read every row
    (torch.nn.MaxPool2d(2, padding=1), False, [1, 1]),
    (torch.nn.MaxPool2d(2), True, [1, 1]),  # another node reads every row
    (torch.nn.MaxPool2d(7), False, [1, 1]),  # 7 mod 7 = 0: reads all
])
def test_conv_padding_trim_only_where_no_value_changes(pool, side_branch, end_pads, tmp_path):
    torch.manual_seed(0)
    model = _ConvPool(pool, side_branch).eval()
    x = torch.rand(2, 3, 7, 7)
    with torch.no_grad():
        expected = model(x).numpy()
    torch.onnx.export(model, (x,), str(tmp_path / "m.onnx"), dynamo=True, input_names=["images"])
    graph = onnx.load(str(tmp_path / "m.onnx"))
    inference._trim_padding_no_pool_reads(graph)
    conv = next(n for n in graph.graph.node if n.op_type == "Conv")
    assert list(next(a.ints for a in conv.attribute if a.name == "pads"))[2:] == end_pads
    onnx.save(graph, str(tmp_path / "trimmed.onnx"))
    out = inference.onnx_session(tmp_path / "trimmed.onnx", 1).run(None, {"images": x.numpy()})[0]
    assert np.abs(out - expected).max() < 1e-5


def test_a_pool_without_strides_moves_by_one_and_reads_every_row():
    # ONNX MaxPool's strides default to 1, not to the kernel: its windows cover the conv's last rows.
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["images", "w"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
         helper.make_node("MaxPool", ["y"], ["out"], kernel_shape=[2, 2])],
        "conv-pool", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 7, 7])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert inference._trim_padding_no_pool_reads(model) == 0
    assert list(model.graph.node[0].attribute[1].ints) == [1, 1, 1, 1]


class _TwoPooledBranches(torch.nn.Module):
    """conv -> (MaxPool -> ReLU, MaxPool -> ReLU) -> concat: two pools read one tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.head = torch.nn.Linear(2 * 8 * 16 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        a = torch.relu(F.max_pool2d(y, 2))
        b = torch.relu(F.max_pool2d(y, 2, padding=1)[..., 1:, 1:])
        return self.head(torch.cat([a, b], 1).flatten(1))


def test_relu_moves_before_each_of_two_pools_that_read_one_tensor(tmp_path):
    model = _TwoPooledBranches().eval()
    path = inference.export_onnx(model, tmp_path / "branches.onnx")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("Relu") == 2 and ops.index("Relu") < ops.index("MaxPool")
    images = torch.rand(3, 3, 32, 32)
    logits = inference.onnx_session(path, 1).run(None, {"images": images.numpy()})[0]
    np.testing.assert_allclose(logits, model(images).detach().numpy(), atol=1e-5)


def test_int8_pads_a_tensor_read_by_two_convs_once(tmp_path):
    # resnet8's second block reads one tensor twice (3x3 body and 1x1 shortcut): 10 channels, padded to 12.
    model = build_classifier(TrainConfig(model="resnet8", widths="10,20,40"), 10).eval()
    fp32 = inference.export_onnx(model, tmp_path / "resnet8.onnx")
    calibration = np.random.default_rng(0).random((16, 3, 32, 32), dtype=np.float32)
    int8 = inference.quantize_int8(fp32, tmp_path / "resnet8.int8.onnx", calibration)
    pads = [n for n in onnx.load(str(int8)).graph.node if n.op_type == "Pad"]
    assert len({n.output[0] for n in pads}) == len(pads)  # each padded tensor is produced once
    logits = inference.onnx_session(int8, 1).run(None, {"images": calibration})[0]
    reference = model(torch.from_numpy(calibration)).detach().numpy()
    assert logits.shape == (16, 10)
    # The padded channels are zeros that change nothing: int8 tracks fp32 to rounding (measured 0.6%).
    assert np.abs(logits - reference).max() < 0.05 * np.abs(reference).max()


def test_export_to_an_unwritable_folder(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ExportError, match=f"cannot write to {blocker / 'out'}"):
        inference.check_writable_folder(blocker / "out")
    too_long = tmp_path / ("a" * 300)
    with pytest.raises(ExportError, match=f"^cannot write to {too_long / 'out'}: File name too long$"):
        inference.check_writable_folder(too_long / "out")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")  # a folder cannot be made where it points, nor in it
    for folder in (tmp_path / "link", tmp_path / "link" / "out"):
        with pytest.raises(ExportError, match=f"^cannot write to {folder}: {tmp_path / 'link'} is a link to "
                                              f"{tmp_path / 'nowhere'}, which does not exist$"):
            inference.check_writable_folder(folder)


# --------------------------------------------------------------------------------------------------
# Benchmark report


def test_benchmark_report_has_every_field(tiny_trained, tmp_path):
    model, splits = tiny_trained
    cfg = BenchmarkConfig(batch_sizes="1,4", threads=1, **QUICK, **FLOOR)
    report = inference.run_benchmark(
        model, label="tiny-seed", cfg=cfg, calibration=inference.calibration_images(splits.train, 64),
        test=splits.test, work_dir=tmp_path,
    )
    document = json.loads(json.dumps(report.to_dict()))  # JSON-serialisable as written
    assert document["model"] == {
        "name": "tiny-seed", "parameters": 152_458, "macs_per_image": 5_863_424,
        "weight_bytes_fp32": report.facts.weight_bytes_fp32, "weight_bytes_int8": report.facts.weight_bytes_int8,
    }
    assert 590_000 < document["model"]["weight_bytes_fp32"] < 620_000  # 152,458 fp32 values + 2 constants
    assert document["machine"]["threads"] == 1 and document["machine"]["cpu"]
    assert {"cores", "cpu_capability", "cpu_native_bf16", "torch_version", "onnxruntime_version"} <= set(
        document["machine"])
    assert document["settings"]["batch_sizes"] == [1, 4] and document["settings"]["repeats"] == 3
    assert document["settings"]["calibration_images"] == 64 and document["settings"]["test_images"] == 100
    assert document["settings"]["pytorch_memory_format"] == "torch.channels_last"
    cpu_backends = ["pytorch-fp32", "pytorch-bf16", "onnxruntime-fp32", "onnxruntime-int8"]
    assert [b["name"] for b in document["backends"]] == cpu_backends
    if not torch.cuda.is_available():
        assert document["skipped"] == {"pytorch-fp32-cuda": "no CUDA GPU", "pytorch-bf16-cuda": "no CUDA GPU"}
    latency_fields = {"batch_size", "threads", "calls", "p50_ms", "p90_ms", "p99_ms", "mean_ms",
                      "images_per_second", "repeat_p50_ms", "spread"}
    for backend in document["backends"]:
        assert backend["precision"] in ("fp32", "bf16", "int8")
        assert set(backend["latency"]) == {"1", "4"}
        for batch_size, stats in backend["latency"].items():
            assert set(stats) == latency_fields
            assert stats["batch_size"] == int(batch_size) and len(stats["repeat_p50_ms"]) == 3
            assert 0 < stats["p50_ms"] <= stats["p99_ms"]
        agreement = backend["agreement"]
        assert agreement["images"] == 100 and backend["test_accuracy"] == agreement["accuracy"]
    by_name = {b["name"]: b for b in document["backends"]}
    assert by_name["pytorch-fp32"]["agreement"]["top1_agreement"] == 1.0
    assert by_name["onnxruntime-fp32"]["agreement"]["max_abs_logit_diff"] < 1e-4
    assert 0 < by_name["pytorch-bf16"]["agreement"]["max_abs_logit_diff"] < 1  # it did compute in bf16
    assert by_name["pytorch-fp32"]["test_accuracy"] > 0.5
    floor = document["compute_floor"]
    assert floor["fp32_macs_per_second"] > 1e9 and floor["threads"] == 1 and floor["matmul_size"] == 256
    assert floor["fp32_floor_ms"] == pytest.approx(5_863_424 / floor["fp32_macs_per_second"] * 1e3)
    best = document["best_batch1"]
    assert best["backend"] == min(document["backends"], key=lambda b: b["latency"]["1"]["p50_ms"])["name"]
    assert best["ratio_to_fp32_floor"] == pytest.approx(best["p50_ms"] / floor["fp32_floor_ms"])
    table = report.table()
    for name in cpu_backends:
        assert name in table
    assert "compute floor" in table and "152,458 parameters" in table


def test_benchmark_without_batch_size_one(tmp_path):
    cfg = BenchmarkConfig(batch_sizes="2", threads=1, backends="onnxruntime-fp32", **QUICK, **FLOOR)
    report = inference.run_benchmark(seed_model(), label="seed", cfg=cfg, work_dir=tmp_path)
    document = report.to_dict()
    assert document["best_batch1"] is None and list(document["backends"][0]["latency"]) == ["2"]
    assert "img/s b2" in report.table() and "best batch-1" not in report.table()


def test_a_benchmark_with_no_runnable_backend_fails_before_exporting(tmp_path):
    cfg = BenchmarkConfig(batch_sizes="1", threads=1, backends="onnxruntime-int8", **QUICK, **FLOOR)
    with pytest.raises(ConfigError) as error:
        inference.run_benchmark(seed_model(), label="seed", cfg=cfg, calibration_missing="no --data-dir",
                                work_dir=tmp_path)
    assert str(error.value) == "none of the backends can run here: onnxruntime-int8: no --data-dir"
    assert list(tmp_path.iterdir()) == []  # nothing exported


# --------------------------------------------------------------------------------------------------
# Pareto front


def test_pareto_front_on_hand_made_points():
    # (accuracy, latency ms)
    points = [
        (0.70, 1.0),  # front: the fastest of the accurate ones
        (0.72, 2.0),  # front: most accurate
        (0.60, 0.5),  # front: fastest
        (0.65, 1.5),  # dominated by (0.70, 1.0)
        (0.72, 3.0),  # dominated by (0.72, 2.0): as accurate, slower
        (0.60, 0.8),  # dominated by (0.60, 0.5): as accurate, slower
        (0.70, 1.0),  # a tie with the first: both stay on the front
    ]
    accuracy, latency = zip(*points)
    assert pareto_front(accuracy, latency).tolist() == [True, True, True, False, False, False, True]
    assert pareto_front([0.5], [1.0]).tolist() == [True]
    with pytest.raises(ValueError):
        pareto_front([0.5, 0.6], [1.0])


def test_tradeoff_points_pair_one_pass_latency_with_one_pass_accuracy(tracking_store):
    from cifar_exp.deployment import tradeoff_points

    sources = {}
    # An export logged its checks into "plain" (perhaps on another test folder): not the run's accuracy.
    for name, metrics in [("tta", {"test_accuracy": 0.87, "test_accuracy_without_tta": 0.85}),
                          ("plain", {"test_accuracy": 0.72, "pytorch-fp32/test_accuracy": 0.61})]:
        with tracking.start_run("pareto-sources", name) as run_id:
            tracking.log_metrics(metrics)
        sources[name] = run_id
    for name, run_id in sources.items():
        tags = {"run_kind": "benchmark", "source_run_id": run_id, "model": "seed"}
        with tracking.start_run("pareto-sources", f"benchmark-{name}", tags=tags):
            # the benchmark measured int8's accuracy itself, not fp32's: fp32 borrows the source run's
            tracking.log_metrics({"parameters": 1000, "pytorch-fp32/b1/p50_ms": 1.0,
                                  "onnxruntime-int8/b1/p50_ms": 0.5, "onnxruntime-int8/test_accuracy": 0.84})
    points = {(p.label.split(" ")[0], p.backend): p.accuracy for p in tradeoff_points(tracking.find_runs("pareto-sources"))}
    assert points == {("tta", "pytorch-fp32"): 0.85, ("tta", "onnxruntime-int8"): 0.84,
                      ("plain", "pytorch-fp32"): 0.72, ("plain", "onnxruntime-int8"): 0.84}


# --------------------------------------------------------------------------------------------------
# Command line


@pytest.mark.parametrize("command", ["benchmark", "export", "pareto"])
def test_every_inference_option_has_help(command):
    from cifar_exp import cli

    result = run_cli(command, "--help")
    assert result.exit_code == 0 and "Usage:" in result.output
    for param in getattr(cli, command).params:
        assert param.help, param.name


def all_runs():
    client = MlflowClient()
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.fixture(scope="module")
def logged(tiny_data, tmp_path_factory):
    """A tracked training run of seed on the tiny set, in a module-wide store: (run_id, store, cache)."""
    from cifar_exp.experiment import train_and_track

    root = tmp_path_factory.mktemp("store")
    cache = str(root / "cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        cfg = ExperimentConfig(
            data=DataConfig(data_dir=str(tiny_data), val_size=50, cache_dir=cache),
            train=TrainConfig(epochs=3, batch_size=32, lr=0.05, amp=False, eval_batch_size=100),
            tracking=TrackingConfig(experiment_name="inference"),
        )
        outcome = train_and_track(cfg)
        yield outcome.run_id, root, cache


@pytest.fixture
def in_store(logged, monkeypatch):
    run_id, root, cache = logged
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    return run_id, root, cache


@pytest.mark.slow
def test_export_cli_logs_verified_files_into_the_models_run(in_store, tiny_data, tmp_path, caplog):
    run_id, _, cache = in_store
    result = run_cli("export", "--model-uri", f"runs:/{run_id}/model", "--int8", "--output-dir", tmp_path / "out",
                     "--data-dir", tiny_data, "--cache-dir", cache, "--calibration-images", "200",
                     "--run-name", "my-export")
    assert result.exit_code == 0, result.output
    assert f"logged under onnx/ in the model's run {run_id}" in result.output
    assert f"--run-name not used: the files are logged into the model's own run {run_id}" in caplog.text
    assert "model.onnx: test accuracy" in result.output and "top-1 agreement 100.00%" in result.output
    assert (tmp_path / "out" / "model.onnx").is_file() and (tmp_path / "out" / "model.int8.onnx").is_file()
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"  # logging into it did not reopen it
    assert {a.path for a in client.list_artifacts(run_id, "onnx")} == {
        "onnx/model.onnx", "onnx/model.int8.onnx", "onnx/export_checks.json"}
    metrics = run.data.metrics
    assert metrics["onnxruntime-fp32/top1_agreement"] == 1.0
    assert metrics["onnxruntime-fp32/test_accuracy"] == pytest.approx(metrics["test_accuracy"], abs=0.02)
    assert abs(metrics["onnxruntime-int8/test_accuracy"] - metrics["onnxruntime-fp32/test_accuracy"]) <= 0.05
    assert run.data.tags["onnx_exported"] == "int8"
    checks = json.loads((tmp_path / "out" / "export_checks.json").read_text())
    assert checks["onnx_int8"]["images"] == 100 and checks["calibration_images"] == 200
    # The run's own test images, the ones its test_accuracy was measured on
    assert checks["data_dir"] == str(tiny_data.resolve()) and checks["test_digest"] == tracking.dataset_digest(run_id,
                                                                                                             "test")
    assert checks["calibration_source_digest"] == load_dataset(DataConfig(data_dir=str(tiny_data), cache_dir=cache))[0].digest()


@pytest.mark.slow
def test_an_export_verified_on_other_test_images_goes_into_a_new_run_that_names_them(in_store, tiny_data, tmp_path,
                                                                                     caplog):
    # Its accuracies would otherwise sit beside the model run's test_accuracy, measured on other images,
    # with nothing in the run to tell them apart.
    _, _, cache = in_store
    run_id = _model_run("other-test-images", tiny_data, cache)
    other = tmp_path / "other"
    for split in ("train", "test"):
        for folder in sorted((tiny_data / split).iterdir()):
            (other / split / folder.name).mkdir(parents=True)
            for image in sorted(folder.iterdir())[: 3 if split == "test" else None]:
                (other / split / folder.name / image.name).symlink_to(image)
    caplog.set_level(logging.INFO, logger="cifar_exp")
    args = ["export", "--model-uri", f"runs:/{run_id}/model", "--int8", "--calibration-images", "64",
            "--output-dir", tmp_path / "out", "--data-dir", other, "--cache-dir", cache]
    # A new run it cannot open is refused in one line, before it says that it would open one
    MlflowClient().delete_experiment(MlflowClient().create_experiment("gone-exports"))
    refused = run_cli(*args, "--experiment-name", "gone-exports")
    assert refused.exit_code == 1 and "Error: experiment 'gone-exports' was deleted" in refused.output
    assert "logged into a new run" not in caplog.text and not (tmp_path / "out").exists()
    before = {r.info.run_id for r in all_runs()}
    result = run_cli(*args, "--experiment-name", "exports")
    assert "logged into a new run" in caplog.text
    assert result.exit_code == 0, result.output
    [export_run] = [r for r in all_runs() if r.info.run_id not in before]
    assert f"logged under onnx/ in run {export_run.info.run_id}" in result.output and "30 test images" in result.output
    assert export_run.data.tags["run_kind"] == "export" and export_run.data.tags["source_run_id"] == run_id
    assert export_run.data.params["data.data_dir"] == str(other)
    test, _, _ = load_test_set(DataConfig(data_dir=str(other), cache_dir=cache))
    assert tracking.dataset_digest(export_run.info.run_id, "test") == test.digest() != tracking.dataset_digest(run_id, "test")
    assert tracking.dataset_digest(export_run.info.run_id, "calibration") == load_dataset(
        DataConfig(data_dir=str(other), cache_dir=cache))[0].digest()
    checks = json.loads((tmp_path / "out" / "export_checks.json").read_text())
    assert checks["test_digest"] == test.digest() and checks["data_dir"] == str(other.resolve())
    source = MlflowClient().get_run(run_id)
    assert not [key for key in source.data.metrics if "/" in key] and "onnx_exported" not in source.data.tags


@pytest.mark.slow
def test_benchmark_then_pareto_cli(in_store, tiny_data, tmp_path):
    run_id, _, cache = in_store
    before = {r.info.run_id for r in all_runs()}
    output = tmp_path / "reports" / "bench.json"  # a folder the benchmark creates
    # --model, --widths and --hidden at their defaults, written out as the MLproject's entry point does
    result = run_cli("benchmark", "--model-uri", f"runs:/{run_id}/model", "--data-dir", tiny_data,
                     "--model", "seed", "--widths", "", "--hidden", "0",
                     "--cache-dir", cache, "--experiment-name", "inference", "--threads", "1",
                     "--output", output, *QUICK_ARGS)
    assert result.exit_code == 0, result.output
    assert "onnxruntime-int8" in result.output and "compute floor" in result.output
    document = json.loads(output.read_text())
    assert document["source_run_id"] == run_id and document["model_uri"] == f"runs:/{run_id}/model"
    new = [r for r in all_runs() if r.info.run_id not in before]
    assert len(new) == 1
    bench = new[0]
    assert bench.info.status == "FINISHED"
    assert bench.data.tags["run_kind"] == "benchmark" and bench.data.tags["source_run_id"] == run_id
    assert bench.data.tags["model"] == f"runs:/{run_id}/model"
    assert bench.data.tags["pytorch_memory_format"] == "torch.channels_last"
    # the images its accuracies were measured on, and those int8 calibrated on, as dataset inputs
    assert tracking.dataset_digest(bench.info.run_id, "test") == tracking.dataset_digest(run_id, "test") is not None
    assert tracking.dataset_digest(bench.info.run_id, "calibration") == load_dataset(
        DataConfig(data_dir=str(tiny_data), cache_dir=cache))[0].digest()
    metrics = bench.data.metrics
    assert metrics["macs_per_image"] == 5_863_424 and metrics["parameters"] == 152_458
    for backend in ("pytorch-fp32", "pytorch-bf16", "onnxruntime-fp32", "onnxruntime-int8"):
        for batch_size in (1, 4):
            stats = document["backends"][[b["name"] for b in document["backends"]].index(backend)]
            assert metrics[f"{backend}/b{batch_size}/p50_ms"] == pytest.approx(
                stats["latency"][str(batch_size)]["p50_ms"])
        assert metrics[f"{backend}/test_accuracy"] > 0.5
    artifacts = {a.path for a in MlflowClient().list_artifacts(bench.info.run_id)}
    assert {"benchmark.json", "benchmark.txt", "benchmark_table.json"} <= artifacts

    pareto = run_cli("pareto", "--experiment-name", "inference")
    assert pareto.exit_code == 0, pareto.output
    assert "points on the front" in pareto.output
    pareto_run = next(r for r in all_runs() if r.data.tags.get("run_kind") == "pareto")
    assert pareto_run.info.status == "FINISHED"
    assert pareto_run.data.metrics["points"] == 4  # one trained model on four CPU backends
    mlflow.artifacts.download_artifacts(run_id=pareto_run.info.run_id, dst_path=str(tmp_path / "p"))
    assert (tmp_path / "p" / "plots" / "pareto.png").stat().st_size > 10_000
    with open(tmp_path / "p" / "pareto.csv") as f:
        rows = list(csv.DictReader(f))
    on_front = [row["on_front"] == "True" for row in rows]
    # The CSV holds the four points the benchmark logged, marked as the front computation marks them.
    latencies = {row["backend"]: float(row["latency_ms"]) for row in rows}
    assert latencies == pytest.approx({b: metrics[f"{b}/b1/p50_ms"] for b in latencies}) and len(rows) == 4
    assert on_front == pareto_front([float(r["accuracy"]) for r in rows], [float(r["latency_ms"]) for r in rows]).tolist()
    assert pareto_run.data.metrics["front_points"] == sum(on_front) >= 1


def test_benchmark_cli_with_an_architecture_name(in_store, tmp_path):
    before = {r.info.run_id for r in all_runs()}
    # No --data-dir, and no ./data folder beside the store: int8 has nothing to calibrate on.
    result = run_cli("benchmark", "--model", "seed", "--backends", "onnxruntime-fp32,onnxruntime-int8",
                     "--output", tmp_path / "b.json", "--threads", "1",
                     "--experiment-name", "untrained", *QUICK_ARGS)
    assert result.exit_code == 0, result.output
    assert "onnxruntime-int8    skipped: no calibration images (data dir data does not exist" in result.output
    document = json.loads((tmp_path / "b.json").read_text())
    (tmp_path / "new-file").write_text("")  # the report is as readable as any new file, not private
    assert (tmp_path / "b.json").stat().st_mode == (tmp_path / "new-file").stat().st_mode
    assert document["model"]["name"] == "seed" and document["source_run_id"] is None
    assert [b["name"] for b in document["backends"]] == ["onnxruntime-fp32"]
    assert list(document["skipped"]) == ["onnxruntime-int8"] and document["model"]["weight_bytes_int8"] is None
    [run] = [r for r in all_runs() if r.info.run_id not in before]
    assert run.data.tags["model"] == "seed" and run.data.tags["model_uri"] == "none (untrained)"
    assert "onnxruntime-fp32/b1/p50_ms" in run.data.metrics
    assert "onnxruntime-fp32/test_accuracy" not in run.data.metrics  # untrained: no accuracy to report


def test_a_benchmark_interrupted_as_its_run_closes_finished_keeps_its_report(in_store, tmp_path, monkeypatch,
                                                                              project_signal_handlers):
    # A signal held back while the run closes FINISHED is raised after it: the run stays, and pareto
    # reads it, so the --output report it logged stays too.
    from cifar_exp import interrupts

    def closed_as_ctrl_c_came(status):
        with interrupts.deferred():
            os.kill(os.getpid(), signal.SIGINT)
            mlflow.end_run(status=status)

    monkeypatch.setattr(tracking, "_end_run", closed_as_ctrl_c_came)
    before = {r.info.run_id for r in all_runs()}
    result = run_cli("benchmark", "--model", "seed", "--backends", "onnxruntime-fp32", "--output",
                     tmp_path / "b.json", "--threads", "1", "--experiment-name", "interrupted", *QUICK_ARGS)
    assert result.exit_code == 128 + signal.SIGINT and "Aborted: SIGINT." in result.output
    [run] = [r for r in all_runs() if r.info.run_id not in before]
    assert run.info.status == "FINISHED"
    assert json.loads((tmp_path / "b.json").read_text())["model"]["name"] == "seed"


@pytest.mark.parametrize(("on_the_gpu", "devices"), [(0, "cpu"), (1, "cpu,cuda"), (2, "cuda")])
def test_a_benchmark_run_is_tagged_with_the_devices_it_measured_on(in_store, tmp_path, monkeypatch, on_the_gpu,
                                                                   devices):
    # No GPU here: the first ``on_the_gpu`` results are relabelled as measured on CUDA, as the -cuda backends' are.
    measured = deployment.run_benchmark

    def partly_on_the_gpu(*args, **kwargs):
        report = measured(*args, **kwargs)
        return dataclasses.replace(report, backends=[dataclasses.replace(b, device="cuda") if i < on_the_gpu else b
                                                     for i, b in enumerate(report.backends)])

    monkeypatch.setattr(deployment, "run_benchmark", partly_on_the_gpu)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "A GPU")
    result = run_cli("benchmark", "--model", "seed", "--backends", "pytorch-fp32,onnxruntime-fp32", "--experiment-name",
                     f"gpu-{on_the_gpu}", "--output", tmp_path / "b.json", "--threads", "1", *QUICK_ARGS)
    assert result.exit_code == 0, result.output
    [run] = MlflowClient().search_runs([MlflowClient().get_experiment_by_name(f"gpu-{on_the_gpu}").experiment_id])
    tags = run.data.tags
    assert tags["device"] == devices and tags["device_name"] == tracking.cpu_name()
    assert tags.get("cuda_device_name") == ("A GPU" if on_the_gpu else None)


def test_benchmark_cli_measures_an_architecture_at_other_widths(in_store, tmp_path):
    # A Pareto trial's network, e.g. seed at widths 32,16,16 and hidden 256: conv 3->32 (896) +
    # 32->16 (4,624) + 16->16 (2,320) weights and biases, Linear 16->256 (4,352) + 256->10 (2,570).
    result = run_cli("benchmark", "--model", "seed", "--widths", "32,16,16", "--hidden", "256",
                     "--backends", "onnxruntime-fp32",
                     "--output", tmp_path / "b.json", "--threads", "1", "--experiment-name", "narrow", *QUICK_ARGS)
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "b.json").read_text())
    assert document["model"]["parameters"] == 896 + 4_624 + 2_320 + 4_352 + 2_570 == 14_762
    assert document["model"]["name"] == "seed (widths 32,16,16, hidden 256)"
    [run] = [r for r in all_runs() if r.data.tags.get("model") == "seed (widths 32,16,16, hidden 256)"]
    assert run.data.params["train.widths"] == "32,16,16" and run.data.params["train.hidden"] == "256"


@pytest.mark.parametrize(("args", "message"), [
    (["--batch-sizes", "1,0"], "batch-sizes must be comma-separated positive integers, got 0 in '1,0'"),
    (["--batch-sizes", "-4"], "batch-sizes must be comma-separated positive integers, got -4 in '-4'"),
    (["--threads", "-1"], "threads must be >= 0 (0: all cores), got -1"),
    (["--repeats", "0"], "repeats must be >= 1, got 0"),
    (["--backends", "tpu"], "unknown backend 'tpu'"),
    (["--model-uri", "runs:/0123456789abcdef/model", "--widths", "8,8,8"],
     "--widths/--hidden shape an architecture built by name (--model); the model at --model-uri"),
    (["--model-uri", "runs:/0123456789abcdef/model", "--model", "pico"],
     "--model pico names an architecture to build, --model-uri runs:/0123456789abcdef/model a logged model: "
     "give one of them"),
])
def test_bad_benchmark_options_are_one_line_and_touch_nothing(tracking_store, tmp_path, args, message):
    result = run_cli("benchmark", "--output", tmp_path / "b.json", *args)
    assert result.exit_code == 1, result.output
    assert message in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("Error")]) == 1
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "b.json").exists()


@pytest.mark.parametrize("uri", ["models:/no-such-model@champion", "runs:/0123456789abcdef/model"])
def test_benchmark_unknown_model_uri_leaves_no_run(in_store, tmp_path, uri):
    before = len(all_runs())
    result = run_cli("benchmark", "--model-uri", uri, "--output", tmp_path / "b.json")
    assert result.exit_code == 1
    assert f"Error: cannot load model {uri}" in result.output
    assert len(all_runs()) == before and not (tmp_path / "b.json").exists()


def test_benchmark_with_a_data_dir_that_does_not_load_fails(in_store, tmp_path):
    # Named on purpose (here: a typo), it must not silently cost the test accuracies and int8.
    run_id = in_store[0]
    before = len(all_runs())
    result = run_cli("benchmark", "--model-uri", f"runs:/{run_id}/model", "--data-dir", tmp_path / "tiny-cifr",
                     "--output", tmp_path / "b.json")
    assert result.exit_code == 1, result.output
    assert [line for line in result.output.splitlines() if line.startswith("Error")] == [
        f"Error: data dir {tmp_path / 'tiny-cifr'} does not exist (pass --download to fetch CIFAR-10 there)"]
    assert len(all_runs()) == before and not (tmp_path / "b.json").exists()


class _Brightness(torch.nn.Module):  # (B, 3, 32, 32) -> (B,): not a classifier
    def forward(self, images):
        return images.mean((1, 2, 3))


class _LargeImageClassifier(torch.nn.Module):  # (B, 3, 64, 64) -> (B, 10): the wrong input size
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3 * 64 * 64, 10)

    def forward(self, images):
        return self.linear(images.flatten(1))


@pytest.mark.parametrize("command", ["export", "evaluate"])
@pytest.mark.parametrize(("model", "message"), [
    (_Brightness, "is not an image classifier: output (2,) for 2 images"),
    (_LargeImageClassifier, "does not accept (B, 3, 32, 32) images: "),
])
def test_a_model_that_is_no_3x32x32_classifier_is_refused(in_store, tiny_data, tmp_path, command, model, message):
    _, _, cache = in_store
    example = np.zeros((2, 3, 64, 64) if model is _LargeImageClassifier else (2, 3, 32, 32), np.float32)
    with mlflow.start_run(experiment_id=mlflow.set_experiment("models").experiment_id):
        uri = mlflow.pytorch.log_model(model(), name="model", input_example=example, pip_requirements=[]).model_uri
    before = len(all_runs())
    output = ["--output-dir", tmp_path / "out"] if command == "export" else []
    result = run_cli(command, "--model-uri", uri, "--data-dir", tiny_data, "--cache-dir", cache, *output)
    assert result.exit_code == 1
    assert f"Error: model {uri} {message}" in result.output
    assert len(all_runs()) == before and not (tmp_path / "out").exists()


def test_benchmark_rejects_a_model_that_is_not_an_image_classifier(in_store, tmp_path):
    with tracking.start_run("models"):
        uri, _ = tracking.log_model(_Brightness(), None)
    before = len(all_runs())
    result = run_cli("benchmark", "--model-uri", uri, "--output", tmp_path / "b.json")
    assert result.exit_code == 1
    assert f"Error: model {uri} is not an image classifier: output (2,) for 2 images" in result.output
    assert len(all_runs()) == before


def test_benchmark_output_that_cannot_be_written(in_store, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    before = len(all_runs())
    result = run_cli("benchmark", "--output", blocker / "b.json")
    assert result.exit_code == 1 and f"Error: cannot write to {blocker}" in result.output
    assert len(all_runs()) == before
    result = run_cli("benchmark", "--output", tmp_path)  # a folder, not a file
    assert result.exit_code == 1 and f"Error: cannot write {tmp_path}: it is a folder" in result.output
    assert len(all_runs()) == before


def test_export_into_an_unwritable_folder_fails_first(in_store, tiny_data, tmp_path):
    run_id, _, cache = in_store
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    before = MlflowClient().list_artifacts(run_id)
    result = run_cli("export", "--model-uri", f"runs:/{run_id}/model", "--output-dir", blocker / "out",
                     "--data-dir", tiny_data, "--cache-dir", cache)
    assert result.exit_code == 1 and f"Error: cannot write to {blocker / 'out'}" in result.output
    assert MlflowClient().list_artifacts(run_id) == before


def test_export_int8_without_calibration_data(in_store, tmp_path):
    run_id, _, _ = in_store
    result = run_cli("export", "--model-uri", f"runs:/{run_id}/model", "--int8", "--output-dir", tmp_path / "out",
                     "--data-dir", tmp_path / "missing")
    assert result.exit_code == 1
    assert (f"Error: --int8 needs training images to calibrate on: data dir {tmp_path / 'missing'} does not exist"
            in result.output)
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_export_unknown_model_uri(in_store, tmp_path):
    before = len(all_runs())
    result = run_cli("export", "--model-uri", "models:/nothing@champion", "--output-dir", tmp_path / "out")
    assert result.exit_code == 1 and "Error: cannot load model models:/nothing@champion" in result.output
    assert not (tmp_path / "out").exists()  # refused before anything was written
    assert len(all_runs()) == before


def test_pareto_needs_benchmarked_runs(in_store):
    missing = run_cli("pareto", "--experiment-name", "nothing-here")
    assert missing.exit_code == 1 and "no MLflow experiment named 'nothing-here'" in missing.output
    gone = MlflowClient().create_experiment("pareto-gone")
    MlflowClient().delete_experiment(gone)
    deleted = run_cli("pareto", "--experiment-name", "pareto-gone")
    assert deleted.exit_code == 1 and deleted.output == (
        f"Error: experiment 'pareto-gone' was deleted: restore it (`mlflow experiments restore --experiment-id {gone}`) or "
        "pass another --experiment-name\n")
    with tracking.start_run("no-benchmarks"):
        tracking.log_metrics({"test_accuracy": 0.7})
    before = len(all_runs())
    empty = run_cli("pareto", "--experiment-name", "no-benchmarks")
    assert empty.exit_code == 1
    assert ("experiment 'no-benchmarks' has no finished run with both a test accuracy and a benchmark"
            in empty.output)
    assert len(all_runs()) == before


def test_an_untrained_architecture_takes_calibration_images_from_any_dataset(tiny_data, tmp_path):
    # Three of the ten classes: a trained 10-class model's accuracy cannot be measured on them, but an
    # untrained architecture only needs images to calibrate its int8 file.
    from cifar_exp.deployment import _benchmark_data
    from cifar_exp.errors import DataError

    three = tmp_path / "three"
    for split in ("train", "test"):
        for name in sorted(p.name for p in (tiny_data / split).iterdir())[:3]:
            (three / split).mkdir(parents=True, exist_ok=True)
            (three / split / name).symlink_to(tiny_data / split / name)
    data = DataConfig(data_dir=str(three), cache_dir=str(tmp_path / "cache"))
    bench = BenchmarkConfig(backends="onnxruntime-int8", calibration_images=16)
    checks = _benchmark_data(bench, data, 10, trained=False)
    assert checks.calibration.shape == (16, 3, 32, 32) and checks.test is None and checks.missing == ""
    assert list(checks.datasets()) == ["calibration"]  # the training images they were drawn from
    with pytest.raises(DataError, match=f"the model predicts 10 classes but {three} holds 3"):
        _benchmark_data(bench, data, 10, trained=True)


def test_export_of_a_model_whose_run_was_deleted_goes_into_a_new_run(in_store, tiny_data, tmp_path):
    _, _, cache = in_store
    with tracking.start_run("deleted-source") as source_run:
        tracking.log_model(build_classifier(TrainConfig(), 10), "deleted-source-model")
    MlflowClient().delete_run(source_run)  # its registered version still loads; MLflow refuses to log into it
    result = run_cli("export", "--model-uri", "models:/deleted-source-model/1", "--output-dir", tmp_path / "out",
                     "--data-dir", tiny_data, "--cache-dir", cache, "--experiment-name", "exports")
    assert result.exit_code == 0, result.output
    export_run = next(r for r in all_runs() if r.data.tags.get("run_kind") == "export"
                      and r.data.tags["model_uri"] == "models:/deleted-source-model/1")
    assert export_run.info.status == "FINISHED" and export_run.data.tags["source_run_id"] == source_run
    assert export_run.data.tags["onnx_exported"] == "fp32"
    assert export_run.data.params["export.model_uri"] == "models:/deleted-source-model/1"
    assert export_run.data.metrics["onnxruntime-fp32/top1_agreement"] == 1.0
    assert {a.path for a in MlflowClient().list_artifacts(export_run.info.run_id, "onnx")} == {
        "onnx/model.onnx", "onnx/export_checks.json"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["export_checks.json", "model.onnx"]


def test_an_export_that_cannot_be_logged_leaves_the_folder_as_it_was(in_store, tiny_data, tmp_path, monkeypatch):
    _, _, cache = in_store
    run_id = _model_run("never-exported", tiny_data, cache)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_text("an earlier export")

    def store_gone(run_id, **_):
        raise TrackingError(f"cannot log into run {run_id}: the store went away")

    monkeypatch.setattr(tracking, "add_to_run", store_gone)
    result = run_cli("export", "--model-uri", f"runs:/{run_id}/model", "--output-dir", out,
                     "--data-dir", tiny_data, "--cache-dir", cache)
    assert result.exit_code == 1
    assert [line for line in result.output.splitlines() if line.startswith("Error")] == [
        f"Error: cannot log into run {run_id}: the store went away"]
    assert [p.name for p in out.iterdir()] == ["model.onnx"] and (out / "model.onnx").read_text() == "an earlier export"


def _model_run(experiment: str, data_dir: Path, cache: str) -> str:
    """A new run that logged an (untrained) seed model, tested on ``data_dir``'s test images (its
    dataset input ``testing``): one no export has logged into yet."""
    test, _, source = load_test_set(DataConfig(data_dir=str(data_dir), cache_dir=cache))
    with tracking.start_run(experiment) as run_id:
        tracking.log_datasets({"test": test}, source)
        tracking.log_model(build_classifier(TrainConfig(), 10), None)
    return run_id


def test_export_files_that_cannot_be_logged_leave_no_metrics_in_the_models_run(in_store, tiny_data, tmp_path,
                                                                               monkeypatch):
    _, _, cache = in_store
    run_id = _model_run("unwritable-artifacts", tiny_data, cache)

    def permission_denied(self, run_id, local_path, artifact_path=None):
        raise PermissionError(13, "Permission denied", f"mlruns/{run_id}/artifacts/onnx")

    monkeypatch.setattr(MlflowClient, "log_artifact", permission_denied)
    result = run_cli("export", "--model-uri", f"runs:/{run_id}/model", "--output-dir", tmp_path / "out",
                     "--data-dir", tiny_data, "--cache-dir", cache)
    assert result.exit_code == 1 and f"Error: cannot log into run {run_id}: " in result.output
    run = MlflowClient().get_run(run_id)
    assert not [key for key in run.data.metrics if "/" in key] and "onnx_exported" not in run.data.tags


def test_a_second_export_of_a_model_goes_into_a_new_run(in_store, tiny_data, tmp_path):
    # The first export's int8 file and metrics (on another test folder, perhaps) cannot be removed
    # from the model's run: the second export's would sit beside them as if from one export.
    _, _, cache = in_store
    run_id = _model_run("exported-twice", tiny_data, cache)
    uri = f"runs:/{run_id}/model"
    first = run_cli("export", "--model-uri", uri, "--int8", "--calibration-images", "64", "--output-dir",
                    tmp_path / "a", "--data-dir", tiny_data, "--cache-dir", cache)
    assert first.exit_code == 0 and f"in the model's run {run_id}" in first.output, first.output
    second = run_cli("export", "--model-uri", uri, "--no-int8", "--output-dir", tmp_path / "b",
                     "--data-dir", tiny_data, "--cache-dir", cache, "--experiment-name", "exports")
    assert second.exit_code == 0, second.output
    [export_run] = [r for r in all_runs() if r.data.tags.get("run_kind") == "export"
                    and r.data.tags.get("source_run_id") == run_id]
    assert f"logged under onnx/ in run {export_run.info.run_id}" in second.output
    assert export_run.data.tags["onnx_exported"] == "fp32" and "onnxruntime-int8/test_accuracy" not in \
        export_run.data.metrics
    client = MlflowClient()
    assert {a.path for a in client.list_artifacts(run_id, "onnx")} == {
        "onnx/model.onnx", "onnx/model.int8.onnx", "onnx/export_checks.json"}  # the first export's, as it was
    assert client.get_run(run_id).data.tags["onnx_exported"] == "int8"


@pytest.mark.parametrize("taken", ["export_checks.json", "model.onnx"])
def test_export_refuses_an_output_file_name_taken_by_a_folder(in_store, tiny_data, tmp_path, taken):
    run_id, _, cache = in_store
    (tmp_path / "out" / taken).mkdir(parents=True)
    before = MlflowClient().list_artifacts(run_id)
    result = run_cli("export", "--model-uri", f"runs:/{run_id}/model", "--output-dir", tmp_path / "out",
                     "--data-dir", tiny_data, "--cache-dir", cache)
    assert result.exit_code == 1
    assert f"Error: cannot write {tmp_path / 'out' / taken}: it is a folder" in result.output
    assert [p.name for p in (tmp_path / "out").iterdir()] == [taken]
    assert MlflowClient().list_artifacts(run_id) == before


def test_benchmark_into_a_deleted_experiment_fails_before_measuring(in_store, tmp_path):
    MlflowClient().delete_experiment(MlflowClient().create_experiment("gone"))
    before = len(all_runs())
    result = run_cli("benchmark", "--model", "seed", "--experiment-name", "gone", "--output", tmp_path / "b.json")
    assert result.exit_code == 1
    assert [line for line in result.output.splitlines() if line.startswith("Error")] == [
        "Error: experiment 'gone' was deleted: restore it (`mlflow experiments restore --experiment-id "
        f"{MlflowClient().get_experiment_by_name('gone').experiment_id}`) or pass another --experiment-name"]
    assert "p50" not in result.output  # nothing was measured
    assert len(all_runs()) == before and not (tmp_path / "b.json").exists()


def test_benchmark_output_name_too_long_is_one_line(in_store, tmp_path):
    output = tmp_path / ("a" * 300 + ".json")
    result = run_cli("benchmark", "--model", "seed", "--output", output)
    assert result.exit_code == 1
    assert [line for line in result.output.splitlines() if line.startswith("Error")] == [
        f"Error: cannot write {output}: File name too long"]


def test_a_benchmark_that_fails_while_logging_writes_no_report(in_store, tmp_path, monkeypatch):
    def store_gone(*_, **__):
        raise TrackingError("the store went away")

    monkeypatch.setattr(tracking, "log_table", store_gone)
    result = run_cli("benchmark", "--model", "seed", "--backends", "pytorch-fp32", "--experiment-name",
                     "failed-benchmarks", "--output", tmp_path / "reports" / "b.json", *QUICK_ARGS)
    assert result.exit_code == 1 and "Error: the store went away" in result.output
    assert list(tmp_path.iterdir()) == []  # neither the report, its staged copy nor the folder made for them
    [run] = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("failed-benchmarks").experiment_id])
    assert run.info.status == "FAILED"


def test_benchmark_with_a_broken_dataset_at_the_default_folder_fails(in_store, tmp_path, monkeypatch):
    # No dataset at ./data: int8 and the accuracies are skipped, with a warning. A broken one there
    # is an error: skipping would hide it.
    run_id = in_store[0]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "data" / "train" / "cat" / "0.png").write_bytes(b"not an image")
    before = len(all_runs())
    result = run_cli("benchmark", "--model-uri", f"runs:/{run_id}/model", "--output", tmp_path / "b.json")
    assert result.exit_code == 1, result.output
    assert len([line for line in result.output.splitlines() if line.startswith("Error")]) == 1
    assert len(all_runs()) == before and not (tmp_path / "b.json").exists()


def _renamed_class_folder(tiny_data, root):
    """tiny_data with its first class renamed so that it sorts last: every label moves."""
    shutil.copytree(tiny_data, root)
    for split in ("train", "test"):
        (root / split / "airplane").rename(root / split / "zairplane")
    return root


@pytest.mark.parametrize("command", ["export", "benchmark"])
def test_export_and_benchmark_refuse_data_whose_classes_the_model_was_not_trained_on(in_store, tiny_data, tmp_path,
                                                                                     command):
    run_id, _, _ = in_store
    data = _renamed_class_folder(tiny_data, tmp_path / "renamed")
    uri = f"runs:/{run_id}/model"
    artifacts, before = MlflowClient().list_artifacts(run_id), len(all_runs())
    target = (["--output-dir", tmp_path / "out", "--no-int8"] if command == "export" else
              ["--output", tmp_path / "b.json", "--backends", "pytorch-fp32", *QUICK_ARGS])
    result = run_cli(command, "--model-uri", uri, "--data-dir", data, "--cache-dir", tmp_path / "cache", *target)
    assert result.exit_code == 1, result.output
    assert [line for line in result.output.splitlines() if line.startswith("Error")] == [
        f"Error: {uri} was trained on classes {tracking.classes_param(CLASSES)}; {data} holds "
        f"{tracking.classes_param([*CLASSES[1:], 'zairplane'])}"]
    assert len(all_runs()) == before and MlflowClient().list_artifacts(run_id) == artifacts
    assert not (tmp_path / "out").exists() and not (tmp_path / "b.json").exists()


def test_export_and_benchmark_without_int8_need_only_a_test_folder(in_store, tiny_data, tmp_path):
    run_id, _, _ = in_store
    held_out = tmp_path / "held-out"
    shutil.copytree(Path(tiny_data) / "test", held_out / "test")  # a test set shipped on its own
    uri = f"runs:/{run_id}/model"
    exported = run_cli("export", "--model-uri", uri, "--no-int8", "--output-dir", tmp_path / "out",
                       "--data-dir", held_out, "--cache-dir", tmp_path / "cache")
    assert exported.exit_code == 0, exported.output
    assert json.loads((tmp_path / "out" / "export_checks.json").read_text())["onnx_fp32"]["images"] == 100
    measured = run_cli("benchmark", "--model-uri", uri, "--backends", "pytorch-fp32", "--output", tmp_path / "b.json",
                       "--data-dir", held_out, "--cache-dir", tmp_path / "cache", *QUICK_ARGS)
    assert measured.exit_code == 0, measured.output
    [backend] = json.loads((tmp_path / "b.json").read_text())["backends"]
    assert backend["agreement"]["accuracy"] == pytest.approx(MlflowClient().get_run(run_id).data.metrics["test_accuracy"])
    # int8 calibrates on training images: without train/ it is refused, naming what is missing.
    before = len(all_runs())
    refused = run_cli("export", "--model-uri", uri, "--int8", "--output-dir", tmp_path / "out8",
                      "--data-dir", held_out, "--cache-dir", tmp_path / "cache")
    assert refused.exit_code == 1 and "Error: --int8 needs training images to calibrate on: " in refused.output
    refused = run_cli("benchmark", "--model-uri", uri, "--output", tmp_path / "all.json",  # every backend
                      "--data-dir", held_out, "--cache-dir", tmp_path / "cache", *QUICK_ARGS)
    assert refused.exit_code == 1
    assert ("Error: the int8 backend calibrates on training images (--backends without onnxruntime-int8 "
            f"measures without them): {held_out / 'train'} is missing") in refused.output
    assert len(all_runs()) == before and not (tmp_path / "out8").exists() and not (tmp_path / "all.json").exists()


# P6: a full dataset whose train/ is broken keeps its own error (no held-out-test explanation).
def test_benchmark_int8_with_a_broken_train_folder_keeps_its_own_error(tmp_path, cache_dir):
    root = write_image_folder(tmp_path / "d", train_per_class=2, test_per_class=1)
    for image in (root / "train" / "cat").iterdir():
        image.unlink()
    with pytest.raises(DataError) as raised:
        _benchmark_data(BenchmarkConfig(), DataConfig(data_dir=str(root), cache_dir=cache_dir), 10, trained=False)
    assert str(raised.value).startswith(f"class folder {root / 'train' / 'cat'} holds no")


# P7: without int8, a broken held-out test folder is not explained by int8.
def test_benchmark_without_int8_on_a_broken_held_out_folder_keeps_its_own_error(tmp_path, cache_dir):
    root = write_image_folder(tmp_path / "d", train_per_class=2, test_per_class=1)
    shutil.rmtree(root / "train")
    for image in (root / "test" / "cat").iterdir():
        image.unlink()
    bench = BenchmarkConfig(model_uri="runs:/0123/model", backends="pytorch-fp32")
    with pytest.raises(DataError) as raised:
        _benchmark_data(bench, DataConfig(data_dir=str(root), cache_dir=cache_dir), 10, trained=True)
    assert str(raised.value).startswith(f"class folder {root / 'test' / 'cat'} holds no")


# F2-F5: _float_logits leaves a chain alone where another node reads a tensor it would change.
def _quantised_head(extra: str | None):
    """Conv -> Q -> DQ -> Transpose -> Q -> DQ -> logits; ``extra`` names a tensor an Identity also reads."""
    from onnx import TensorProto, helper, numpy_helper

    init = [numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), "w"),
            numpy_helper.from_array(np.array(0.1, np.float32), "s"),
            numpy_helper.from_array(np.array(128, np.uint8), "z")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("QuantizeLinear", ["c", "s", "z"], ["cq"]),
             helper.make_node("DequantizeLinear", ["cq", "s", "z"], ["cd"]),
             helper.make_node("Transpose", ["cd"], ["t"], perm=[0, 2, 3, 1]),
             helper.make_node("QuantizeLinear", ["t", "s", "z"], ["tq"]),
             helper.make_node("DequantizeLinear", ["tq", "s", "z"], ["logits"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1, 1, 4])]
    if extra is not None:
        nodes.append(helper.make_node("Identity", [extra], ["other"]))
        outputs.append(helper.make_tensor_value_info("other", TensorProto.FLOAT if extra != "cq" else TensorProto.UINT8,
                                                     [1, 4, 1, 1]))
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 1, 1])],
                              outputs, init)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_float_logits_drops_every_pair_of_a_lone_conv_head():
    model = _quantised_head(None)
    assert inference._float_logits(model)
    assert [n.op_type for n in model.graph.node] == ["Conv", "Transpose"]
    onnx.checker.check_model(model)


@pytest.mark.parametrize("extra", ["cd", "c", "cq"])  # the 8-bit value, the conv's float, the quantised int
def test_float_logits_keeps_a_chain_another_node_reads_from(extra):
    model = _quantised_head(extra)
    before = [n.op_type for n in model.graph.node]
    assert not inference._float_logits(model)
    assert [n.op_type for n in model.graph.node] == before
