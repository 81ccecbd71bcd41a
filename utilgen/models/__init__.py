"""Downstream classifiers and the TODV weight network."""

from utilgen.models.classifier import CLASSIFIERS, build_classifier
from utilgen.models.weight_net import FEATURES, LossUtility, WeightNet, per_sample_features

__all__ = ["CLASSIFIERS", "FEATURES", "LossUtility", "WeightNet", "build_classifier", "per_sample_features"]
