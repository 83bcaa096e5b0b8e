"""Tests of the model registry: model configs (the export schema) and building any family from one."""

import pytest
from flax import nnx

from puzzle_jax import models


def test_classifier_config_is_the_export_schema_and_builds_the_classifier():
    config = models.classifier_config(
        arch="resnet_tiny", num_classes=3, bn_mode="per_replica", bn_group_size=4, dtype="bfloat16", remat=True
    )
    assert config == {
        "family": "classifier",
        "arch": "resnet_tiny",
        "num_classes": 3,
        "output_stride": 16,
        "bn_mode": "per_replica",
        "bn_group_size": 4,
        "dtype": "bfloat16",
        "remat": True,
        "bn_statistics": "two_pass",
        "grouped_conv": "grouped",
    }
    model = models.create_model(config, rngs=nnx.Rngs(0))
    assert isinstance(model, models.Classifier) and model.classifier.kernel.shape[-1] == 3
    assert model.model.remat is True
    models.set_remat(model, False)
    assert model.model.remat is False
    # The group size is kept only where it means something.
    assert models.classifier_config(arch="resnet_tiny", num_classes=3, bn_group_size=4)["bn_group_size"] is None


def test_configs_without_a_family_are_classifiers():
    legacy = models.classifier_config(arch="resnet_tiny", num_classes=2)
    del legacy["family"]
    assert models.model_family(legacy) == "classifier"
    assert isinstance(models.create_model(legacy, rngs=nnx.Rngs(0)), models.Classifier)


def test_the_program_choices_are_recorded_and_built():
    config = models.classifier_config(
        arch="resnest50", num_classes=2, bn_mode="global", bn_statistics="one_pass", grouped_conv="split"
    )
    model = nnx.eval_shape(lambda: models.create_model(config, rngs=nnx.Rngs(0)))
    assert model.model.layer1[0].conv2.grouped_conv == "split"
    assert {layer.statistics for _, layer in nnx.iter_graph(model) if isinstance(layer, models.BatchNorm)} == {
        "one_pass"
    }
    # Exports written before the fields existed build the programs they ran.
    legacy = dict(config)
    del legacy["bn_statistics"], legacy["grouped_conv"]
    model = nnx.eval_shape(lambda: models.create_model(legacy, rngs=nnx.Rngs(0)))
    assert model.model.layer1[0].conv2.grouped_conv == "grouped" and model.model.bn1.statistics == "two_pass"


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(dtype="float16"), "model.dtype"),
        (dict(remat="auto"), "model.remat"),
        (dict(arch="resnet9"), "arch must be one of"),
        (dict(output_stride=4), "output_stride must be one of"),
        (dict(bn_mode="per_replica"), "bn_group_size must be a positive int"),
        (dict(num_classes=0), "num_classes must be a positive int"),
        (dict(bn_statistics="welford"), "model.bn_statistics='welford'; allowed values"),
        (dict(grouped_conv="fused"), "model.grouped_conv='fused'; allowed values"),
        (dict(grouped_conv="split"), "applies to ResNeSt backbones; resnet_tiny has no grouped"),
    ],
)
def test_bad_model_configs_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        models.classifier_config(**{"arch": "resnet_tiny", "num_classes": 2, **overrides})


def test_an_unknown_family_is_named():
    with pytest.raises(ValueError, match="Unknown model family 'detector'.*'classifier'"):
        models.create_model({"family": "detector"}, rngs=nnx.Rngs(0))
