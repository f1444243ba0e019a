"""The GenEval-style evaluation of 07_eval.py: prompts, known answers, wrong images, noise, the judge's rules."""
import sys

import numpy as np
import pytest

from conftest import stage

world, scoring, ev = stage("01_caption"), stage("02_score"), stage("07_eval")
SIZE = 32


def scene_for(meta, size, rng, tries=100):
    """A scene that satisfies a prompt: its include objects in distinct random cells (colours
    not asked for drawn at random), re-drawn until every position holds. Nothing excluded."""
    groups = [[item.get("color") or str(rng.choice(list(world.COLOURS))) for _ in range(item["count"])]
              for item in meta["include"]]  # per include item, the colour of each of its objects
    assert sum(map(len, groups)) <= len(world.CELLS), meta["prompt"]
    for _ in range(tries):
        cells = iter(rng.permutation(len(world.CELLS)))
        placed = [[world.place(item["class"], colour, world.CELLS[next(cells)], size, rng) for colour in colours]
                  for item, colours in zip(meta["include"], groups)]
        if all(scoring.holds(o, item["position"][0], t, size) for item, group in zip(meta["include"], placed)
               if "position" in item for o in group for t in placed[item["position"][1]]):
            break
    else:
        raise AssertionError(f"no placement on the 2x2 layout satisfies {meta['prompt']!r}")
    relation = None
    for item, group in zip(meta["include"], placed):
        if "position" in item:
            target = placed[item["position"][1]][0]
            relation = {"a": [group[0]["colour"], group[0]["kind"]], "word": item["position"][0],
                        "b": [target["colour"], target["kind"]]}
    return {"objects": [o for group in placed for o in group], "relation": relation}


@pytest.fixture(scope="module")
def metas():
    return ev.geneval_prompts()


@pytest.fixture(scope="module")
def scenes(metas):
    rng = np.random.default_rng(5)
    return [scene_for(m, SIZE, rng) for m in metas]


def renders(scenes, size=SIZE):
    return np.stack([world.render(s, size) for s in scenes])


def obj(kind, colour, cx, cy):
    """A detected object, as the detector reports it (pixel coordinates)."""
    return {"kind": kind, "colour": colour, "cx": cx, "cy": cy}


# ----------------------------------------------------------------------------- prompts
def test_prompts_are_fixed_and_follow_the_schema(metas):
    assert ev.geneval_prompts() == metas and ev.geneval_prompts(seed=1) != metas
    assert [m["tag"] for m in ev.geneval_prompts(per_task=10)] == [t for t in ev.TASKS for _ in range(10)]
    assert ev.TASKS == ("single_object", "two_object", "counting", "colors", "position", "color_attr")
    for task in ev.TASKS:
        assert sum(m["tag"] == task for m in metas) >= 50
    for m in metas:
        assert set(m) == {"tag", "prompt", "include", "exclude"} and m["prompt"].endswith(".")
        n_objects = 0
        for i, item in enumerate(m["include"]):
            assert set(item) <= {"class", "count", "color", "position"} and {"class", "count"} <= set(item)
            assert item["class"] in world.KINDS and isinstance(item["count"], int) and item["count"] >= 1
            assert item.get("color", "red") in world.COLOURS
            if "position" in item:
                word, j = item["position"]
                assert word in ev.WORDS and isinstance(j, int) and 0 <= j < i
            n_objects += item["count"]
        assert n_objects <= len(world.CELLS)
        for item in m["exclude"]:
            assert set(item) == {"class", "count"} and item["class"] in world.KINDS
    assert {item.get("color") for m in metas for item in m["include"]} == set(world.COLOURS) | {None}
    assert {m["include"][1]["position"][0] for m in metas if m["tag"] == "position"} == set(ev.WORDS)


def test_prompt_phrasing(metas):
    first = {task: next(m for m in metas if m["tag"] == task) for task in ev.TASKS}
    assert first["single_object"]["prompt"] in {f"a {k}." for k in world.KINDS}
    two = first["two_object"]["include"]
    assert first["two_object"]["prompt"] == f"a {two[0]['class']} and a {two[1]['class']}." and two[0] != two[1]
    count = first["counting"]
    n, kind = count["include"][0]["count"], count["include"][0]["class"]
    assert count["prompt"] == f"{world.NUMBERS[n]} {kind}s." and count["exclude"] == [{"class": kind, "count": n + 1}]
    assert {m["include"][0]["count"] for m in metas if m["tag"] == "counting"} == {2, 3, 4}


def test_a_world_asks_only_for_its_tasks_and_the_same_prompts():
    """The first rung of the ladder (one object an image) is asked single_object and colors only,
    the same prompts as in the full set."""
    one = ev.geneval_prompts(10, tasks=ev.WORLD_TASKS["one"])
    full = ev.geneval_prompts(10)
    assert {m["tag"] for m in one} == {"single_object", "colors"}
    assert one == [m for m in full if m["tag"] in ("single_object", "colors")]


@pytest.mark.parametrize("task", ["colors", "position", "color_attr"])
def test_coloured_prompts_are_in_the_caption_language(metas, task):
    """The caption parser of 02_score.py reads the same facts back from the prompt text."""
    for m in (m for m in metas if m["tag"] == task):
        groups, relation = scoring.caption_facts(m["prompt"])
        assert groups == {(item["color"], item["class"]): 1 for item in m["include"]}, m["prompt"]
        if task == "position":
            reference, placed = m["include"]
            word = placed["position"][0]
            assert relation == ((placed["color"], placed["class"]), word, (reference["color"], reference["class"]))


def test_prompts_command_prints_every_task(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["07_eval.py", "--geneval-prompts"])
    ev.main()
    out = capsys.readouterr().out
    assert all(task in out for task in ev.TASKS)


# ----------------------------------------------------------------------------- known answers
def test_clean_renders_of_right_scenes_score_one(metas, scenes):
    scores = ev.geneval(renders(scenes), metas)
    assert scores == {**{task: 1.0 for task in ev.TASKS}, "overall": 1.0}


def test_right_scenes_at_64_px():
    metas = ev.geneval_prompts(per_task=4, seed=2)
    rng = np.random.default_rng(6)
    images = renders([scene_for(m, 64, rng) for m in metas], 64)
    assert all(ev.correctness(images, metas))


def wrong_versions(meta, scene, rng):
    """Edits of a right scene that make it wrong for its prompt."""
    objects = scene["objects"]
    free = [cell for cell in world.CELLS if cell not in {(o["row"], o["col"]) for o in objects}]
    other = lambda colour: str(rng.choice([c for c in world.COLOURS if c != colour]))
    edits = []
    if meta["tag"] in ("single_object", "colors"):
        edits.append([dict(objects[0], kind=next(k for k in world.KINDS if k != objects[0]["kind"]))])
    if meta["tag"] == "colors":
        edits.append([dict(objects[0], colour=other(objects[0]["colour"]))])
    if meta["tag"] == "two_object":
        edits += [objects[:1], objects[1:]]
    if meta["tag"] == "counting":
        edits.append(objects[1:])  # one too few
        if free:  # one too many: the exclude item
            edits.append(objects + [world.place(objects[0]["kind"], "red", free[0], SIZE, rng)])
    if meta["tag"] == "position":  # the two objects swap places
        a, b = objects
        where = ("row", "col", "cx", "cy")
        edits.append([dict(a, **{k: b[k] for k in where}), dict(b, **{k: a[k] for k in where})])
    if meta["tag"] in ("position", "color_attr"):  # the two objects swap colours
        a, b = objects
        edits.append([dict(a, colour=b["colour"]), dict(b, colour=a["colour"])])
    return [{"objects": edit, "relation": None} for edit in edits]


def test_wrong_images_fail(metas, scenes):
    rng = np.random.default_rng(7)
    cases = [(m, wrong) for m, s in zip(metas, scenes) for wrong in wrong_versions(m, s, rng)]
    assert {m["tag"] for m, _ in cases} == set(ev.TASKS)
    right = ev.correctness(renders([wrong for _, wrong in cases]), [m for m, _ in cases])
    failures = [m["prompt"] for (m, _), r in zip(cases, right) if r]
    assert failures == [], f"{len(failures)} of {len(cases)} wrong images judged right, e.g. {failures[:3]}"


def test_noise_scores_near_zero(metas):
    rng = np.random.default_rng(8)
    shape = (len(metas), SIZE, SIZE, 3)
    uniform = rng.integers(0, 256, shape, dtype=np.uint8)
    grey = np.clip(rng.normal(128, 40, shape), 0, 255).astype(np.uint8)
    for noise in (uniform, grey):
        assert ev.geneval(noise, metas)["overall"] < 0.1


def test_random_scenes_score_well_below_one():
    """A scene unrelated to its prompt is sometimes right by chance, but far from always."""
    metas = ev.geneval_prompts(per_task=32, seed=3)
    rng = np.random.default_rng(9)
    scores = ev.geneval(renders([world.sample_scene(rng, SIZE) for _ in metas]), metas)
    assert 0 < scores["overall"] < 0.5 and scores["single_object"] > scores["color_attr"]


# ----------------------------------------------------------------------------- the judge's rules
def meta(include, exclude=()):
    return {"tag": "test", "prompt": "", "include": include, "exclude": list(exclude)}


def test_include_counts_at_least():
    two_circles = meta([{"class": "circle", "count": 2}])
    circles = [obj("circle", "red", 8, 8), obj("circle", "blue", 24, 8), obj("circle", "red", 8, 24)]
    assert ev.judge(circles[:2], two_circles, SIZE) and ev.judge(circles, two_circles, SIZE)
    assert not ev.judge(circles[:1], two_circles, SIZE)
    assert not ev.judge([obj("square", "red", 8, 8)] * 2, two_circles, SIZE)


def test_exclude_makes_counts_exact_whatever_the_colour():
    exactly_two = meta([{"class": "circle", "count": 2}], [{"class": "circle", "count": 3}])
    circles = [obj("circle", "red", 8, 8), obj("circle", "blue", 24, 8), obj("circle", "green", 8, 24)]
    assert ev.judge(circles[:2] + [obj("square", "red", 24, 24)], exactly_two, SIZE)
    assert not ev.judge(circles, exactly_two, SIZE)
    no_exclude = {"tag": "counting", "prompt": "", "include": exactly_two["include"]}  # as GenEval files may be
    assert ev.judge(circles, no_exclude, SIZE)


def test_colour_is_checked_on_the_kept_objects():
    blue_circle = meta([{"class": "circle", "count": 1, "color": "blue"}])
    assert ev.judge([obj("circle", "red", 8, 8), obj("circle", "blue", 24, 8)], blue_circle, SIZE)
    assert not ev.judge([obj("circle", "red", 8, 8), obj("square", "blue", 24, 8)], blue_circle, SIZE)
    two_blue = meta([{"class": "circle", "count": 2, "color": "blue"}])
    assert ev.judge([obj("circle", "blue", 8, 8), obj("circle", "red", 24, 8), obj("circle", "blue", 8, 24)], two_blue, SIZE)
    assert not ev.judge([obj("circle", "blue", 8, 8), obj("circle", "red", 24, 8)], two_blue, SIZE)


def test_position_against_every_kept_object():
    left_of_squares = meta([{"class": "square", "count": 2}, {"class": "circle", "count": 1, "position": ["left of", 0]}])
    squares = [obj("square", "red", 24, 8), obj("square", "red", 24, 24)]
    assert ev.judge(squares + [obj("circle", "blue", 8, 16)], left_of_squares, SIZE)
    assert not ev.judge([squares[0], obj("square", "red", 4, 24), obj("circle", "blue", 8, 16)], left_of_squares, SIZE)
    assert not ev.judge(squares + [obj("circle", "blue", 20, 16)], left_of_squares, SIZE)  # within the margin
    above = meta([{"class": "square", "count": 1}, {"class": "circle", "count": 1, "position": ["above", 0]}])
    assert ev.judge([obj("square", "red", 24, 24), obj("circle", "red", 8, 8)], above, SIZE)
    assert not ev.judge([obj("square", "red", 8, 8), obj("circle", "red", 24, 24)], above, SIZE)


def test_position_fails_when_its_reference_failed():
    placed = meta([{"class": "square", "count": 1, "color": "blue"},
                   {"class": "circle", "count": 1, "color": "red", "position": ["left of", 0]}])
    assert ev.judge([obj("circle", "red", 8, 8), obj("square", "blue", 24, 8)], placed, SIZE)
    assert not ev.judge([obj("circle", "red", 8, 8), obj("square", "green", 24, 8)], placed, SIZE)
    assert not ev.judge([obj("circle", "red", 8, 8)], placed, SIZE)


def test_a_stray_patch_of_colour_is_not_an_object():
    """The judge counts an object only from half the area of the smallest drawn object: a
    4x4 patch of red (a failed sample's fragment) is not "a red square"; a real square is."""
    meta = {"tag": "colors", "prompt": "a red square.", "exclude": [],
            "include": [{"class": "square", "count": 1, "color": "red"}]}
    image = np.full((1, 32, 32, 3), world.BACKGROUND, np.uint8)
    image[0, 4:8, 4:8] = world.COLOURS["red"]
    assert ev.correctness(image, [meta]) == [False]
    image[0, 4:12, 4:12] = world.COLOURS["red"]
    assert ev.correctness(image, [meta]) == [True]


def test_alignment_facts_of_clean_renders_and_of_an_extra_object():
    """Clean renders of random scenes with their own short captions: every fact holds and the
    objects are counted right; against each other's captions they score the alignment reward
    of those pairs, well below 1. The same scenes with one more object, of a colour+kind none of
    them has, in a free cell: only nothing_else (and the object counts) change."""
    rng = np.random.default_rng(3)
    scenes = [s for s in (world.sample_scene(rng, SIZE) for _ in range(40)) if len(s["objects"]) < 4][:16]
    captions = [world.caption_short(s) for s in scenes]
    facts = ev.alignment_facts(renders(scenes), captions)
    assert facts["stated_drawn"] == facts["exact_counts"] == facts["relation"] == facts["nothing_else"] == 1.0
    assert facts["objects"] == facts["objects_stated"] == np.mean([len(s["objects"]) for s in scenes])
    rolled = captions[1:] + captions[:1]  # each image against a caption it was not drawn for
    assert facts["other_caption"] == pytest.approx(float(scoring.alignment(renders(scenes), rolled).mean()))
    assert facts["other_caption"] < 0.5
    more = []
    for s in scenes:
        free = next(c for c in world.CELLS if c not in {(o["row"], o["col"]) for o in s["objects"]})
        taken = {(o["colour"], o["kind"]) for o in s["objects"]}
        colour, kind = next((c, k) for c in world.COLOURS for k in world.KINDS if (c, k) not in taken)
        more.append({**s, "objects": s["objects"] + [world.place(kind, colour, free, SIZE, rng)]})
    extra = ev.alignment_facts(renders(more), captions)
    assert extra["stated_drawn"] == extra["exact_counts"] == extra["relation"] == 1.0
    assert extra["nothing_else"] == 0.0 and extra["objects"] == facts["objects"] + 1
