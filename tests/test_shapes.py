"""The synthetic shapes dataset: deterministic, disjoint splits, captions and answers true to the pixels."""

import json
import re

import numpy as np
import pytest

from mmwb.cli.main import main
from mmwb.data.shapes import (
    COLOURS,
    NUMBERS,
    SIZES,
    caption,
    cell_labels,
    make_example,
    questions,
    record_document,
    render,
    sample_scene,
    split_rng,
    swapped_scene,
    write_dataset,
)


def test_examples_are_pure_functions_of_seed_split_and_index():
    image_a, record_a = make_example(3, "train", 5)
    image_b, record_b = make_example(3, "train", 5)
    assert record_a == record_b and np.array_equal(np.asarray(image_a), np.asarray(image_b))
    _, other = make_example(3, "test", 5)
    assert other != record_a


def test_splits_share_no_scene():
    captions = {
        split: {json.dumps(make_example(0, split, i)[1]["objects"]) for i in range(200)}
        for split in ("train", "val", "test")
    }
    assert not captions["train"] & captions["val"] and not captions["train"] & captions["test"]


@pytest.mark.parametrize("index", range(40))
def test_caption_and_answers_describe_the_scene(index):
    rng = split_rng(11, "train", index)
    scene = sample_scene(rng)
    objs = scene.objects
    text = caption(scene)
    for obj in objs:
        assert f"{obj.size} {obj.colour} {obj.shape}" in text
    if len(objs) == 2:
        a, b = objs
        if scene.relation == "left of":
            assert a.x < b.x and abs(a.x - b.x) > abs(a.y - b.y)
        else:
            assert a.y < b.y and abs(a.y - b.y) > abs(a.x - b.x)
    image = np.asarray(render(scene, size=64)).astype(int)
    for obj in objs:  # the centre pixel has the object's colour
        pixel = image[int(obj.y * 64), int(obj.x * 64)]
        assert np.abs(pixel - COLOURS[obj.colour]).max() < 40
    for qa in questions(scene, rng):
        if qa["type"] == "count":
            assert qa["answer"] == NUMBERS[len(objs)]
        elif qa["type"] == "colour":
            shape = qa["question"].split()[-1].rstrip("?")
            assert [o.colour for o in objs if o.shape == shape] == [qa["answer"]]
        elif qa["type"] == "shape":
            colour = qa["question"].split()[4]
            assert [o.shape for o in objs if o.colour == colour] == [qa["answer"]]
        elif qa["type"] == "yesno":
            _, _, _, colour, shape = qa["question"].rstrip("?").split()
            assert (qa["answer"] == "yes") == any(o.colour == colour and o.shape == shape for o in objs)
        else:  # "is the red circle left of the blue star?": true to the named objects' coordinates
            words = qa["question"].rstrip("?").split()
            named = [o for o in objs if (o.colour, o.shape) == (words[2], words[3])]
            other = [o for o in objs if o is not named[0]][0]
            asked = " ".join(words[4:-3])
            dx, dy = other.x - named[0].x, other.y - named[0].y
            truth = {"left of": dx > 0, "right of": dx < 0, "above": dy > 0, "below": dy < 0}[asked]
            assert (qa["answer"] == "yes") == truth


def test_position_questions_name_either_object_first():
    firsts = []
    for index in range(200):
        scene = sample_scene(split_rng(5, "train", index))
        first, second = scene.objects[0], scene.objects[-1]
        if scene.relation is not None and (first.colour, first.shape) != (second.colour, second.shape):
            asked = [q for q in questions(scene, split_rng(5, "train", index)) if q["type"] == "position"]
            firsts.append(
                asked[0]["question"].split()[2:4] == [scene.objects[0].colour, scene.objects[0].shape]
            )
    assert 0.3 < sum(firsts) / len(firsts) < 0.8  # the caption's first object is not always named first


def test_objects_that_look_alike_get_no_position_question():
    """'is the red circle left of the red circle?' has no answer: such scenes are asked none; all others one."""
    alike = 0
    for index in range(600):
        scene = sample_scene(split_rng(0, "test", index))
        asked = [q for q in questions(scene, split_rng(0, "test", index)) if q["type"] == "position"]
        if scene.relation is None:
            assert asked == []
            continue
        first, second = scene.objects
        same = (first.colour, first.shape) == (second.colour, second.shape)
        alike += same
        assert len(asked) == (0 if same else 1)
        if asked:
            words = asked[0]["question"].split()
            assert (words[2], words[3]) != (words[-2], words[-1].rstrip("?"))
    assert alike > 0  # the case occurs in this sample


def test_cli_writes_splits_and_index(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert (
        main(["data", "shapes", "--out", str(out), "--n", "6", "--n-eval", "2", "--seed", "4", "--json"]) == 0
    )
    doc = json.loads(capsys.readouterr().out)
    assert doc["splits"] == {"train": 6, "val": 2, "test": 2} and doc["seed"] == 4
    lines = (out / "train.jsonl").read_text().splitlines()
    assert len(lines) == 6
    first = json.loads(lines[0])
    assert (out / first["image"]).is_file() and first["caption"] == make_example(4, "train", 0)[1]["caption"]


def test_worker_processes_write_the_same_files_as_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    write_dataset(one, 7, seed=3, size=16, n_eval=3, progress=False, workers=1)
    write_dataset(two, 7, seed=3, size=16, n_eval=3, progress=False, workers=2, block=2)  # several blocks
    written = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert len(written) == 7 + 3 + 3 + 4  # images, three indexes, meta.json
    assert written == sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file())
    assert all((one / name).read_bytes() == (two / name).read_bytes() for name in written)


def test_cli_refuses_bad_sizes(tmp_path, capsys):
    assert main(["data", "shapes", "--out", str(tmp_path), "--n", "0"]) == 2
    assert "--n and --n-eval must be at least 1" in capsys.readouterr().err


def test_a_record_document_holds_the_caption_then_every_qa_pair_as_chat_turns():
    _, record = make_example(0, "test", 0)
    text = record_document(record, np.random.default_rng(0))
    assert text.startswith(record["caption"] + "<|user|>")
    turns = text.removeprefix(record["caption"]).split("<|user|>")[1:]
    assert sorted(turns) == sorted(f"{qa['question']}<|assistant|> {qa['answer']}" for qa in record["qa"])
    assert text == record_document(record, np.random.default_rng(0))


def test_a_swapped_twin_keeps_the_words_and_changes_the_binding():
    rng = np.random.default_rng(0)
    for index in range(60):
        _, record = make_example(0, "train", index)
        twin = swapped_scene(record, (220, 220, 220), rng)
        objects = record["objects"]
        assert [(o.x, o.y, o.size) for o in twin.objects] == [(o["x"], o["y"], o["size"]) for o in objects]
        assert caption(twin) != record["caption"]
        looks = sorted((o["shape"], o["colour"]) for o in objects)
        if len(set(looks)) > 1:  # same words in another order; otherwise one object is recoloured
            assert sorted((o.shape, o.colour) for o in twin.objects) == looks
            words = [sorted(text.replace(",", "").split()) for text in (caption(twin), record["caption"])]
            assert words[0] == words[1]
        render(twin, 32)


def test_cell_labels_name_the_object_covering_each_cell_centre():
    red_circle = {"shape": "circle", "colour": "red", "size": "large", "x": 0.5, "y": 0.25}
    labels = cell_labels([red_circle], grid=4).reshape(4, 4, 3)
    covered = np.zeros((4, 4), dtype=bool)
    covered[0:2, 1:3] = (
        True  # centres (0.375 | 0.625, 0.125 | 0.375) lie 0.177 from the centre, under r = 0.19
    )
    assert (labels[covered] == [1, 1, 2]).all()  # 1 + index of red, circle, large
    assert (labels[~covered] == 0).all()


def test_cell_labels_are_true_to_the_pixels_of_circles():
    """A cell labelled with a circle shows the circle's colour at its centre (away from the anti-aliased rim)."""
    checked = 0
    for index in range(40):
        image, record = make_example(0, "train", index, size=64)
        pixels = np.asarray(image).astype(int)
        labels = cell_labels(record["objects"], grid=8).reshape(8, 8, 3)
        for obj in (o for o in record["objects"] if o["shape"] == "circle"):
            for row, col in zip(*np.nonzero(labels[..., 1] == 1)):
                inner = SIZES[obj["size"]] - 2 / 64
                if np.hypot((col + 0.5) / 8 - obj["x"], (row + 0.5) / 8 - obj["y"]) < inner:
                    assert list(COLOURS)[labels[row, col, 0] - 1] == obj["colour"]
                    centre = pixels[row * 8 + 3 : row * 8 + 5, col * 8 + 3 : col * 8 + 5]  # (2, 2, 3)
                    assert np.abs(centre - COLOURS[obj["colour"]]).max() < 40
                    checked += 1
    assert checked > 20


def test_practice_questions_are_true_and_leave_the_rest_of_the_record_alone():
    for index in range(30):
        plain_image, plain = make_example(0, "train", index)
        image, record = make_example(0, "train", index, practice=True)
        assert np.array_equal(np.asarray(plain_image), np.asarray(image))
        assert record["qa"][: len(plain["qa"])] == plain["qa"] and record["caption"] == plain["caption"]
        objects = record["objects"]
        extra = record["qa"][len(plain["qa"]) :]
        looks = {f"{o['colour']} {o['shape']}" for o in objects}
        assert {q["question"] for q in extra if q["type"] == "yesno"} == {
            f"is there a {look}?" for look in looks
        }
        assert all(q["answer"] == "yes" for q in extra if q["type"] == "yesno")
        for q in (q for q in extra if q["type"] == "position"):
            assert len(objects) == 3
            first, asked, second = re.fullmatch(
                r"is the (\w+ \w+) (left of|right of) the (\w+ \w+)\?", q["question"]
            ).groups()
            x = {f"{o['colour']} {o['shape']}": o["x"] for o in objects}
            truth = "left of" if x[first] < x[second] else "right of"
            assert q["answer"] == ("yes" if asked == truth else "no")


def test_practice_questions_go_to_the_train_split_only(tmp_path):
    write_dataset(tmp_path / "a", 6, seed=0, size=32, n_eval=6, progress=False)
    write_dataset(tmp_path / "b", 6, seed=0, size=32, n_eval=6, progress=False, practice=True)
    for split in ("val", "test"):
        assert (tmp_path / "a" / f"{split}.jsonl").read_text() == (
            tmp_path / "b" / f"{split}.jsonl"
        ).read_text()
    assert (tmp_path / "a" / "train.jsonl").read_text() != (tmp_path / "b" / "train.jsonl").read_text()
