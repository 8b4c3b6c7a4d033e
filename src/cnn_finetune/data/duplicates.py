"""Images that are the same picture: under two labels, twice in one class, or in both the training and test data.

The check compares the preprocessed 28x28 images, byte for byte: what the model sees. So a PNG and its
JPEG copy, or one scan saved at two sizes, count as the same image when they come out the same, and two
files that differ only in their metadata too. It changes nothing: the data is trained on as given, and
the groups are reported (``data_report.json`` -> ``duplicates``, a warning at start-up, the model card).

Why it matters, measured on real data: in the QMNIST letters (``../shared/data/qmnist``) 98 of the 8,400
images are byte-identical copies in the folders of two letters (о and ө, к and қ). A model cannot be
right on both labels of one image, and a test image that is a copy of a training image under another
label is an error for a model that has learned its training data. The label review (``label_review.csv``) finds such
images from the training's margins; this check names the exact copies before the first step.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ..files.rundir import DATA_REPORT
from ..log import printable

EXAMPLES = 20  # groups listed in full in data_report.json; the counts cover all of them


def _rows(images: torch.Tensor) -> np.ndarray:
    """One opaque value per image (its bytes), so that numpy compares and sorts whole images."""
    flat = np.ascontiguousarray(images.reshape(images.shape[0], -1).numpy())
    return flat.view(np.dtype((np.void, flat.shape[1]))).ravel()


def _groups(keys: np.ndarray) -> list[np.ndarray]:
    """Indices of the rows of ``keys`` that occur more than once, one array per distinct value, in order."""
    if keys.size == 0:
        return []
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    repeated = np.flatnonzero(counts > 1)
    if repeated.size == 0:
        return []
    order = np.argsort(inverse, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return sorted((order[starts[g]: starts[g] + counts[g]] for g in repeated), key=lambda idx: int(idx[0]))


def find_duplicates(images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str],
                    origin: Sequence[str], pictures: list[torch.Tensor] | None = None) -> dict[str, Any]:
    """Groups of identical images in one data set: ``across_classes`` (the same image under two or more
    labels; ``unavoidable_errors``: how many of them any one prediction per picture gets wrong) and
    ``within_class`` (repeated under one label). Plain data for data_report.json; names are
    shown as ``log.printable`` writes them (class names stay as the data report's ``class_names``).
    ``pictures``: if given, the image of each listed group under two labels is appended to it (for report.html)."""
    labels_np = labels.numpy()
    across, within_extra, within_groups, forced = [], 0, 0, 0
    for idx in _groups(_rows(images)):
        names = sorted({class_names[int(labels_np[i])] for i in idx})
        if len(names) > 1:
            # One prediction per picture: at best it matches the label most of its copies carry.
            forced += len(idx) - int(np.bincount(labels_np[idx]).max())
            files = [{"image": printable(origin[int(i)]), "label": class_names[int(labels_np[i])]} for i in idx]
            across.append({"labels": names, "images": files})
            if pictures is not None and len(across) <= EXAMPLES:
                pictures.append(images[int(idx[0])].clone())
        else:
            within_groups += 1
            within_extra += len(idx) - 1
    return {"across_classes": {"groups": len(across), "images": sum(len(g["images"]) for g in across),
                               "unavoidable_errors": forced, "examples": across[:EXAMPLES]},
            "within_class": {"groups": within_groups, "extra_copies": within_extra}}


def find_overlap(train_images: torch.Tensor, train_labels: torch.Tensor, train_names: Sequence[str],
                 train_origin: Sequence[str], test_images: torch.Tensor, test_labels: torch.Tensor,
                 test_names: Sequence[str], test_origin: Sequence[str]) -> dict[str, Any]:
    """Test images that are copies of a training image, and how many of them carry another label there.

    Such a test image measures memory rather than generalisation when the labels agree; when they do not,
    a model that has learned its training data gets it wrong. Classes are compared by name (the test data
    may order them otherwise).
    """
    train_keys, test_keys = _rows(train_images), _rows(test_images)
    if train_keys.size == 0 or test_keys.size == 0:
        return {"images": 0, "other_label": 0, "examples": []}
    order = np.argsort(train_keys, kind="stable")
    sorted_keys = train_keys[order]
    # Every training copy of test image j: order[start[j]:stop[j]] (an empty range when there is none).
    start = np.searchsorted(sorted_keys, test_keys, side="left")
    stop = np.searchsorted(sorted_keys, test_keys, side="right")
    tl, tr = test_labels.numpy(), train_labels.numpy()
    copies, other, examples = 0, 0, []
    for j in np.flatnonzero(stop > start):
        matches = order[start[j]:stop[j]].tolist()
        test_label = test_names[int(tl[j])]
        labels_there = sorted({train_names[int(tr[i])] for i in matches})
        copies += 1
        differs = labels_there != [test_label]
        other += int(differs)
        if differs and len(examples) < EXAMPLES:
            examples.append({"test_image": printable(test_origin[int(j)]), "test_label": test_label,
                             "training_images": [printable(train_origin[i]) for i in matches[:3]],
                             "training_labels": labels_there})
    return {"images": copies, "other_label": other, "examples": examples}


def describe(found: dict[str, Any], source: str, listed_in: str = DATA_REPORT, test: bool = False) -> list[str]:
    """Warnings for the log (none when the data has no copies under two labels); ``test``: the data is
    scored, so say how many errors the copies force on any model."""
    across = found["across_classes"]
    if not across["groups"]:
        return []
    g = across["examples"][0]
    pair = " = ".join(f"{x['image']} ({x['label']})" for x in g["images"][:2])
    cost = (f"at least {across['unavoidable_errors']} of them are errors whatever a model predicts" if test
            else "the model cannot be right on both")
    return [f"{source}: {across['images']} images are {across['groups']} picture(s) under two or more labels "
            f"(the same pixels after preprocessing), e.g. {pair}: a label or copying error, or classes that look "
            f"alike at 28x28; {cost}. Fix or remove them; all are listed in {listed_in} (duplicates)"]


def describe_overlap(found: dict[str, Any], source: str) -> list[str]:
    """Warnings for the start-up log about test images that are copies of training images."""
    if not found["images"]:
        return []
    line = (f"test data {source}: {found['images']} test image(s) are copies of training or validation images, so the "
            f"test accuracy partly measures memory")
    if found["other_label"]:
        e = found["examples"][0]
        line += (f"; {found['other_label']} of them carry another label in the training data (errors for a model that "
                 f"has learned its training data), e.g. {e['test_image']} ({e['test_label']}) = {e['training_images'][0]} "
                 f"({', '.join(e['training_labels'])})")
    return [line + f"; listed in {DATA_REPORT} (duplicates)"]
