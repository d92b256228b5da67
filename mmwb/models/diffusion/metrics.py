"""Does the image follow its control? Edge F1 between the generated image's canny edges and the control edges.

An edge pixel counts as matched when an edge of the other map lies within ``tolerance`` pixels (Euclidean), the
usual tolerance of boundary benchmarks (BSDS): a contour drawn one pixel off is still the same contour.
Precision asks how many generated edges the control explains, recall how many control edges were drawn.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy.ndimage import distance_transform_edt

from mmwb.data.conditions import ConditionOptions, canny


def edge_map(image: Image.Image | np.ndarray, options: ConditionOptions | None = None) -> np.ndarray:
    """(H, W) bool canny edges of an RGB image."""
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.uint8)
    return canny(rgb, options or ConditionOptions())[:, :, 0] > 0


def control_edges(condition: Image.Image) -> np.ndarray:
    """(H, W) bool edges of a white-on-black edge map (a canny conditioning image)."""
    return np.asarray(condition.convert("L")) > 127


def edge_f1(predicted: np.ndarray, reference: np.ndarray, tolerance: float = 1.5) -> dict[str, float]:
    """Precision, recall and F1 of ``predicted`` edges against ``reference`` edges, both (H, W) bool."""
    if predicted.shape != reference.shape:
        raise ValueError(f"edge maps differ in shape: {predicted.shape} vs {reference.shape}")
    precision = _matched(predicted, reference, tolerance)
    recall = _matched(reference, predicted, tolerance)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def image_edge_f1(
    image: Image.Image,
    condition: Image.Image,
    tolerance: float = 1.5,
    options: ConditionOptions | None = None,
) -> float:
    """Edge F1 of a generated ``image`` against the canny ``condition`` it was generated from."""
    return edge_f1(edge_map(image, options), control_edges(condition), tolerance)["f1"]


def _matched(edges: np.ndarray, other: np.ndarray, tolerance: float) -> float:
    """Fraction of ``edges`` pixels within ``tolerance`` of an ``other`` pixel (0 when ``edges`` is empty)."""
    if not edges.any() or not other.any():
        return 0.0
    distance = distance_transform_edt(~other)  # distance of every pixel to the nearest ``other`` edge
    return float((distance[edges] <= tolerance).mean())
