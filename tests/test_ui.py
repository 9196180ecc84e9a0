"""The UI's conversions and handlers without a server: `steering/views.py` (pure) and the
`steering/ui/` handlers that need no generation. The Memory tab is read on a simulated 8 GB
card with a desktop on it, through the real probe, plan and manager."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import gradio as gr
import pytest
from _server import ROOT, ensure_embedded_loaded

from steering import catalog, gpu, limits, ui
from steering.errors import InputError
from steering.loader import get_manager
from steering.ui import autotune as ui_autotune
from steering.ui import common as ui_common
from steering.ui import endpoints as ui_endpoints
from steering.ui import history as ui_history
from steering.ui import memory as ui_memory
from steering.ui import model as ui_model
from steering.ui import recipes as ui_recipes
from steering.ui import steer as ui_steer
from steering.ui import sweep as ui_sweep
from steering.ui import vectors as ui_vectors
from steering.ui import views


def test_table_rows_become_steer_vectors():
    rows = [
        ["dogs", "", "", 0.5, 12, True],
        ["", "happy", "sad", "1.5", "", "false"],  # contrastive; empty layer -> the slider's layer
        ["", "", "", "", "", True],  # an empty row is skipped
        ["cats", None, float("nan"), "", None, None],  # pandas-style empty cells; no coeff -> default
        ["owls", "", "", 0.5, 12, True, " all "],
    ]
    assert views.rows_to_vectors(rows, default_layer=15) == [
        {"text": "dogs", "coeff": 0.5, "layer": 12, "enabled": True},
        {"positive": "happy", "negative": "sad", "coeff": 1.5, "layer": 15, "enabled": False},
        {"text": "cats", "layer": 15, "enabled": True},
        {"text": "owls", "coeff": 0.5, "layer": 12, "enabled": True, "positions": "all"},
    ]


def test_direction_vectors_live_in_the_store_and_round_trip():
    directions: dict = {}
    vectors = [
        {"direction": [0.5, -1.0, 2.0], "coeff": 1.0, "layer": 4, "enabled": True, "positions": "all"},
        {"text": "dogs", "layer": 3},
    ]
    rows = views.vectors_to_rows(vectors, 15, directions)
    assert rows[0][0] == "⟨direction 1: 3 numbers⟩" and directions == {rows[0][0]: [0.5, -1.0, 2.0]}
    back = views.rows_to_vectors(rows, 15, directions)
    assert back[0] == vectors[0] and back[1]["text"] == "dogs"
    with pytest.raises(InputError, match="^vectors: "):
        views.vectors_to_rows(vectors, 15)  # no store to put the numbers in


def test_vectors_round_trip_through_the_table():
    vectors = [
        {"text": "dogs", "coeff": 0.5, "layer": 3, "enabled": True, "positions": "prompt"},
        {"positive": "a", "negative": "b", "coeff": -1.0, "layer": 7, "enabled": False, "positions": "all"},
    ]
    assert views.rows_to_vectors(views.vectors_to_rows(vectors, 15), 15) == vectors
    assert views.vectors_to_rows([{"text": "x", "coeff": 1, "layer": 2}], 15)[0][6] == "prompt"  # the default
    assert views.vectors_to_rows([{"text": "x", "coeff": 1, "layer": None}], 15)[0][4] == 15
    assert views.similarity_items(vectors + [{"text": "dogs"}]) == ["dogs"]  # disabled pair left out, no repeats
    pair = {"positive": "a", "negative": "b", "coeff": 1.0, "layer": 7}
    assert views.similarity_items([pair, vectors[0], pair]) == [{"positive": "a", "negative": "b"}, "dogs"]


def test_coefficients_text():
    assert views.parse_coeffs("0, 0.5 1,-2") == [0.0, 0.5, 1.0, -2.0]
    for bad in ("", "one, two"):
        with pytest.raises(InputError, match="^coeffs: "):
            views.parse_coeffs(bad)


def test_recipe_round_trip_and_rejects(tmp_path, embedded_dir):
    ensure_embedded_loaded()
    rows = [["dogs", "", "", 0.5, 15, True, "all"]]
    path, saved = ui_recipes.save_recipe("Hi there", rows, 15, 32, 0.7, 0.9, 3, "stock", True, True)
    assert saved.startswith("Saved 1 vector(s)")
    recipe = json.loads(open(path).read())
    assert recipe["format"] == views.RECIPE_FORMAT and recipe["vectors"][0]["text"] == "dogs"
    assert recipe["model"] == {"id": "SmolLM2-135M-Instruct", "quant": "fp32"}
    *fields, directions, message = ui_recipes.load_recipe(path, 15)
    assert fields == ["Hi there", rows, 32, 0.7, 0.9, 3, "stock", True, True]  # ..., raw prompt, prompted
    assert directions == {} and "capture mode stock, raw prompt on, prompted on" in message and "⚠️" not in message
    assert recipe["settings"]["prompted"] is True
    assert views.parse_recipe(json.dumps(dict(recipe, settings={})))["settings"]["prompted"] is False  # older files
    with pytest.raises(InputError, match="^recipe.settings.prompted: "):
        views.parse_recipe(json.dumps(dict(recipe, settings={"prompted": "yes"})))
    other = dict(recipe, model={"id": "Qwen/Qwen2.5-7B-Instruct", "quant": "4bit"})
    (tmp_path / "other.json").write_text(json.dumps(other))
    *_, message = ui_recipes.load_recipe(str(tmp_path / "other.json"), 15)
    assert "⚠️ It was made with Qwen/Qwen2.5-7B-Instruct (4bit); SmolLM2-135M-Instruct (fp32) is loaded" in message
    version_1 = {k: v for k, v in recipe.items() if k != "model"}
    version_1 |= {"version": 1, "settings": {"max_new_tokens": 32, "temperature": 0.0, "top_p": 1.0, "seed": 0}}
    assert views.parse_recipe(json.dumps(version_1))["settings"]["capture_mode"] == "bos-neutral"
    # Versions 1 and 2 were made when every vector was added at all positions: they replay so.
    version_2 = dict(recipe, version=2, vectors=[{"text": "dogs", "coeff": 0.5, "layer": 15}])
    assert views.parse_recipe(json.dumps(version_2))["vectors"][0]["positions"] == "all"
    assert views.parse_recipe(json.dumps(version_1))["vectors"][0]["positions"] == "all"
    assert recipe["version"] == 3 and recipe["vectors"][0]["positions"] == "all"  # recorded, not defaulted
    for text, field in (
        ("{not json", "recipe"),
        ('{"format": "other"}', "recipe"),
        (json.dumps({"format": views.RECIPE_FORMAT, "vectors": "x"}), "recipe.vectors"),
    ):
        with pytest.raises(InputError, match=f"^{field}: "):
            views.parse_recipe(text)
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    *unchanged, message = ui_recipes.load_recipe(str(bad), 15)  # a refusal: a message, nothing else touched
    assert message.startswith("⚠️ recipe: ") and all(_skipped(v) for v in unchanged)


def _skipped(value) -> bool:
    return isinstance(value, dict) and value.get("__type__") == "update" and len(value) == 1


def _refusal(outputs) -> str:
    """The inline message of a refused UI handler, after checking every other output is unchanged."""
    *others, message = outputs
    assert all(_skipped(v) for v in others), others
    return message.removeprefix("⚠️ ")


def test_add_and_remove_rows(embedded_dir):
    ensure_embedded_loaded()
    rows, *cleared = ui_steer.add_vector_row([], "dogs", "", "", 0.5, 15)
    rows, *_ = ui_steer.add_vector_row(rows, "", "happy", "sad", 1.0, 10)
    assert rows == [["dogs", "", "", 0.5, 15, True, "prompt"], ["", "happy", "sad", 1.0, 10, True, "prompt"]]
    assert cleared == ["", "", "", ""]  # the three texts and the message line
    for args, field in (
        ((" ", "", "", 0.5, 15), "text"),
        (("", "happy", "", 0.5, 15), "negative"),  # a pair needs both texts: refused at entry
        (("cats", "a", "b", 0.5, 15), "text"),  # a text and a pair at once
        (("cats", "", "", 1000, 15), "coeff"),
        (("cats", "", "", "lots", 15), "coeff"),
        (("cats", "", "", 0.5, 40), "layer"),  # the embedded model has 30 layers
        (("x", "", "", 0.5, "fifteen"), "layer"),
    ):
        assert _refusal(ui_steer.add_vector_row(rows, *args)).startswith(f"{field}: "), args
    assert ui_steer.remove_vector_row(rows, 0) == (rows[:1], "")  # 0: the last row
    assert ui_steer.remove_vector_row(rows, 1) == (rows[1:], "")
    assert _refusal(ui_steer.remove_vector_row(rows, 5)).startswith("row: give a row number from 1 to 2")
    for outputs in (
        ui_steer.add_vector_row([[]] * 349_000, "x", "", "", 0.5, 15),
        ui_steer.remove_vector_row([[]] * 349_000, 1),
    ):  # called by name with a huge table: refused at once
        assert _refusal(outputs).startswith("vectors: the table holds too many rows")


def test_table_edits_are_checked_at_entry(embedded_dir):
    ensure_embedded_loaded()
    rows = [
        ["dogs", "", "", 0.5, 3, True],
        ["", "", "", 0, 0, False],  # a row the table's "+" added: made a working vector-to-be
        ["cats", "", "", "lots", 99, True],  # not a number; beyond the model's 30 layers
        ["", "happy", "", 0.5, 3, True],
        ["owls", "", "", 0.5, 3, True, "reply"],  # not a positions value
    ]

    fixed, message = ui_steer.check_table(rows, 15)
    assert fixed == [
        ["dogs", "", "", 0.5, 3, True, "prompt"],
        ["", "", "", 1.0, 15, True, "prompt"],
        ["cats", "", "", 1.0, 29, True, "prompt"],
        ["", "happy", "", 0.5, 3, True, "prompt"],
        ["owls", "", "", 0.5, 3, True, "prompt"],
    ]
    assert "row 3, coeff: must be a number" in message and "(reset to 1)" in message
    assert "row 5, positions: must be one of prompt, all (reset to prompt)" in message
    assert "row 3, layer: must be an integer from 0 to 29; got 99 (set to 29)" in message
    assert "row 4: a contrastive pair needs both" in message
    assert all(_skipped(v) for v in ui_steer.check_table(fixed[:2], 15, "⚠️ coeff: other"))  # nothing to fix
    table, cleared = ui_steer.check_table(fixed[:2], 15, message)  # its own problems fixed: message cleared
    assert _skipped(table) and cleared == ""


def test_people_count_rows_from_one():
    rows = [["", "", "", "", "", True], ["dogs", "", "", 0.5, 3, True], ["cats", "", "", 1000, 3, True]]
    numbers = views.table_row_numbers(rows)
    assert numbers == [2, 3]
    message = views.for_people("vectors[1].coeff: must be a number from -20 to 20; got 1000", numbers)
    assert message == "row 3, coeff: must be a number from -20 to 20; got 1000"


def test_run_line_says_how_the_run_ended():
    result = {"model": "m", "quant": "fp32", "device": "cpu", "layers": [15], "tokens": [24, 20]}
    assert (
        views.run_line(result, elapsed_s=2.0, seed=7)
        == "m (fp32, cpu) · steered layers [15] · 24 tokens, 12.0 tokens/s, seed 7"
    )
    assert views.run_line(result, elapsed_s=0, seed=7, stopped=True).endswith("stopped after 24 tokens")
    assert "no vector active: both outputs are unsteered" in views.run_line(
        {**result, "layers": []}, elapsed_s=1, seed=0
    )


def test_status_line_and_fallback_notice():
    status = {
        "model": "m",
        "quant": "4bit",
        "device": "cuda:0",
        "n_layers": 28,
        "default_layer": 14,
        "locked": True,
        "memory": {"cuda_allocated_bytes": 3 * gpu.GiB, "process_rss_bytes": gpu.GiB},
    }
    line = views.status_line(status)
    assert "**m** · 4bit · cuda:0 · 28 layers (default 14) · VRAM allocated 3.00 GiB" in line
    assert "locked" in line
    event = {
        "time": "t",
        "stage": "generation",
        "asked": {"model": "big", "quant": "4bit"},
        "loaded": {"model": "small", "quant": "4bit", "device": "cuda:0"},
        "reason": "out of memory",
    }
    notice = views.fallback_notice(event)
    assert "`big` (4bit)" in notice and "`small` (4bit)" in notice and "out of memory" in notice
    assert views.fallback_notice(None) == ""


def test_heatmap_and_sweep_views():
    html = views.heatmap_html(["<b>x</b>", "y"], [[1.0, -0.5], [-0.5, 1.0]], 15)
    assert "&lt;b&gt;x&lt;/b&gt;" in html and "<b>x</b>" not in html  # texts are escaped
    assert "rgb(0,0,255)" in html and "rgb(255,127,127)" in html  # +1 blue, -0.5 light red
    row = {
        "coeff": 0.5,
        "text": "a",
        "effect": 0.3,
        "perplexity": math.e,
        "relevance": 0.25,
        "repetition": 0.1,
        "fluent": True,
    }
    result = {"rows": [row], "recommended": 0.5}
    assert views.sweep_table(result) == [[0.5, "★", "a", 0.25, "yes", 2.72, 0.1, 0.3]]


def test_memory_tab_on_a_simulated_reference_card(embedded_dir):
    ensure_embedded_loaded()
    with gpu.use_nvml(gpu.simulate_gpu(8 * gpu.GiB, int(0.7 * gpu.GiB))):
        card, bars, shown, plan, events = ui_memory.refresh_memory(2048)
    assert "mode `simulated`" in card and "desktop overhead 716.80 MiB" in card
    assert shown["visible"] is True and "No NVIDIA GPU" not in card  # a card: its processes are listed
    processes = shown["value"]
    assert [p[1].rsplit("/", 1)[-1] for p in processes] == ["Xorg", "gnome-shell", "firefox"]
    assert all(p[4] == "desktop" for p in processes)
    by_model = {(row[0], row[1]): dict(zip(views.PLAN_COLUMNS, row)) for row in plan}
    small, big = by_model[("Qwen/Qwen2.5-1.5B-Instruct", "4bit")], by_model[("Qwen/Qwen2.5-7B-Instruct", "4bit")]
    assert small["verdict"] == "stable" and small["spare / short by"].startswith("spare ")
    assert big["verdict"] == "fragile" and big["spare / short by"].startswith("short by ")  # within the margin
    compare, sweep = (int(n) for n in small["fits (compare / sweep tokens)"].split(" / "))
    assert sweep < compare  # 8 rows fit fewer tokens per row than 2
    assert isinstance(events, list)
    # The picture: the loaded model first, then one bar per plan row, with the headroom lines.
    assert bars.count('class="bar-row"') == len(plan) + 1
    assert "loaded: SmolLM2-135M-Instruct fp32" in bars and "border-left:2px dashed" in bars


def test_memory_bars_scale_to_the_larger_of_need_and_headroom():
    row = {"need_bytes": 3 * gpu.GiB, "verdict": "wont_fit", "breakdown": {"weights": 2 * gpu.GiB, "kv_cache": gpu.GiB}}
    html = views.memory_bars_html([("big", row)], headroom_bytes=2 * gpu.GiB, margin_bytes=gpu.GiB)
    assert "width:66.67%" in html and "width:33.33%" in html  # 2 and 1 GiB of 3 GiB
    assert "left:66.67%" in html and "left:33.33%" in html  # headroom 2 GiB, minus the margin 1 GiB
    assert "short by 2.00 GiB" in html  # 3 GiB needed, 1 GiB usable with the margin


def test_builtin_example_fills_the_form_and_asks_before_overwriting(embedded_dir):

    ensure_embedded_loaded()
    prompt, rows, *settings, directions, _, _ = ui_recipes.confirm_example("Golden Gate Bridge")
    assert prompt and rows == [["the Golden Gate Bridge", "", "", 1.0, 15, True, "prompt"]]  # the middle of 30 layers
    assert settings == [64, 0.0, 1.0, 0, "contexts", False, False] and directions == {}
    assert _refusal(ui_recipes.confirm_example("nope")).startswith("example: ")
    *fields, confirm, message = ui_recipes.use_example("Dogs", [])  # an empty table: opens at once
    assert fields[1][0][0] == "dogs" and message.startswith("Opened")
    *fields, confirm, message = ui_recipes.use_example("Dogs", [["cats", "", "", 0.5, 15, True]])
    assert all(_skipped(v) for v in fields) and confirm.visible is True and "replaces the prompt, the 1" in message
    *fields, confirm, message = ui_recipes.confirm_example("Dogs")
    assert fields[1][0][0] == "dogs" and confirm.visible is False


def test_model_handlers_share_one_queue_slot_and_lock_disables_switching(embedded_dir):
    ensure_embedded_loaded()
    demo = ui.build_demo(ui.UIConfig(lock_model=True))
    fns = {f.name: f for f in demo.fns.values() if f.name}
    endpoint_groups = {name: group for _, name, group in ui_endpoints.ENDPOINTS}
    runs_model = [name for name, group in endpoint_groups.items() if group is ui_common.MODEL]
    assert {"steer", "sweep", "similarity", "load_model"} <= set(runs_model)
    runs_model += ["load_selected_model", "generate_outputs", "run_sweep", "show_similarity"]
    assert all((fns[n].concurrency_id, fns[n].concurrency_limit) == ("model", 1) for n in runs_model)
    assert all(fns[n].concurrency_id == "info" for n, g in endpoint_groups.items() if g is ui_common.INFO)
    public = {n for n, f in fns.items() if f.api_visibility == "public"}
    assert public == set(endpoint_groups)
    assert demo._queue.max_size == 32 and demo.api_open is False
    assert _load_button(demo).interactive is False
    assert _load_button(ui.build_demo(ui.UIConfig())).interactive is not False


def _load_button(demo) -> gr.Button:
    return next(b for b in demo.blocks.values() if isinstance(b, gr.Button) and b.value == "Load")


def test_every_limited_control_matches_its_declared_limit(embedded_dir):
    ensure_embedded_loaded()
    demo = ui.build_demo()
    bound = {}
    for block in demo.blocks.values():
        for cls in getattr(block, "elem_classes", None) or []:
            if cls.startswith("limit-"):
                bound[cls.removeprefix("limit-")] = block
    assert set(bound) >= {"max_new_tokens", "sweep_max_new_tokens", "temperature", "top_p", "seed", "coeff", "context"}
    for name, control in bound.items():
        limit = limits.LIMITS[name]
        assert control.value == limit.default, name
        if isinstance(control, gr.Number):  # checked by the handler, so a bad number gets a message
            assert control.maximum is None and control.info == limit.range_text(), name
            continue
        assert control.maximum == limit.maximum, name
        if limit.min_exclusive:
            assert limit.minimum < control.minimum <= limit.maximum, name
        else:
            assert control.minimum == limit.minimum, name


def test_recipe_defaults_and_sweep_default_come_from_the_limits():
    import inspect

    from steering import api, engine

    assert views.DEFAULT_SETTINGS == {
        **{name: limits.LIMITS[name].default for name in ("max_new_tokens", "temperature", "top_p", "seed")},
        "capture_mode": engine.DEFAULT_CAPTURE_MODE,
        "raw_prompt": False,
        "prompted": False,
    }
    assert set(views.CAPTURE_MODES) == set(engine.CAPTURE_MODES)
    assert views.CAPTURE_MODES[0] == engine.DEFAULT_CAPTURE_MODE
    sweep_default = inspect.signature(api.sweep).parameters["max_new_tokens"].default
    assert sweep_default == limits.LIMITS["sweep_max_new_tokens"].default
    assert inspect.signature(api.steer).parameters["max_new_tokens"].default == limits.LIMITS["max_new_tokens"].default


def test_api_module_does_not_import_gradio():
    import subprocess
    import sys

    code = "import sys, steering.api; sys.exit('gradio' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ui.__file__.rsplit("/steering/", 1)[0]).returncode == 0


def test_recipe_json_refuses_nan():
    with pytest.raises(InputError, match=r"^recipe: holds a number that is not finite"):
        views.recipe_json(views.make_recipe("Hi", [{"text": "dogs", "coeff": float("nan")}], {}))


def test_recipes_are_bounded_and_standard_json(tmp_path):
    """Recipe handlers can be called by name: they check what /steer checks, read and write
    bounded files in one folder of the app's, and never write NaN."""
    rows = [["dogs", "", "", 0.5, 15, True]]
    first, _ = ui_recipes.save_recipe("Hi", rows, 15, 32, 0.0, 1.0, 0)
    second, _ = ui_recipes.save_recipe("Hi", rows, 15, 32, 0.0, 1.0, 0)
    assert os.path.dirname(first) == os.path.dirname(second) and first != second  # one folder, two files
    for bad_args, field in (
        (("x" * 5_000_000, rows, 15, 32, 0.0, 1.0, 0), "recipe.prompt"),
        (("Hi", rows, 15, 10**6, 0.0, 1.0, 0), "max_new_tokens"),
        (("Hi", rows, 15, 32, float("nan"), 1.0, 0), "temperature"),  # (a NaN table cell reads as empty)
    ):
        assert _refusal(ui_recipes.save_recipe(*bad_args)).startswith(f"{field}: ")
    for name, text, field in (
        ("many.json", json.dumps({"format": views.RECIPE_FORMAT, "vectors": [{}] * 349_000}), "recipe"),
        ("deep.json", "[" * 100_000 + "]" * 100_000, "recipe"),
        (
            "vectors.json",
            json.dumps({"format": views.RECIPE_FORMAT, "vectors": [{"text": "a"}] * 65}),
            "recipe.vectors",
        ),
    ):
        path = tmp_path / name
        path.write_text(text)
        assert _refusal(ui_recipes.load_recipe(str(path), 15)).startswith(f"{field}: ")


def test_sweep_plot_has_markers_round_ticks_one_scale_and_the_recommended_row():
    from steering.ui import plots

    assert plots.nice_ticks(0, 0.75) == [0, 0.2, 0.4, 0.6]
    assert plots.nice_ticks(-20, 20) == [-20, -10, 0, 10, 20]
    rows = [
        {"coeff": c, "text": "t", "relevance": r, "perplexity": p, "fluent": p <= 30}
        for c, r, p in ((0.0, 0.0, 2.0), (0.25, 0.5, 5.0), (0.45, 1.5, 12.0), (0.75, 2.0, 90.0))
    ]
    svg = plots.sweep_svg({"rows": rows, "recommended": 0.45})
    assert svg.count('class="marker"') == 8  # every measured point of both series
    assert 'class="recommended"' in svg and "fluency boundary (perplexity 30)" in svg
    assert len(re.findall(r'class="x-tick"', svg)) == 4
    ppl_ticks = re.findall(r'class="ppl-tick"[^>]*>([^<]*)<', svg)
    assert ppl_ticks == ["2", "5", "10", "20", "50", "100"]  # plain perplexities on a log scale, 30 and 90 inside
    assert plots.log_ticks(1.2, 30) == [1, 2, 5, 10, 20, 50] and plots.log_ticks(3, 4e4)[-1] == 1e5
    assert "The plot appears" in plots.sweep_svg({"rows": [{"coeff": 0.5, "text": "partial"}]})  # streaming rows


def test_sweep_plot_draws_the_prompted_reference_as_labelled_dashed_lines_in_the_legend():
    from steering.ui import plots, views

    rows = [
        {"coeff": c, "text": "t", "relevance": r, "perplexity": p, "fluent": p <= 30}
        for c, r, p in ((0.0, 0.0, 2.0), (0.5, 0.4, 5.0), (1.0, 1.5, 12.0))
    ]
    plain = plots.sweep_svg({"rows": rows, "recommended": 1.0})
    assert "prompted" not in plain  # no reference row, no line and no legend entry
    reference = {"text": "Dogs are loyal.", "instruction": "In your answer, talk about dogs.", "relevance": 3.2,
                 "perplexity": 200.0, "repetition": 0.0, "fluent": False}  # fmt: skip
    svg = plots.sweep_svg({"rows": rows, "recommended": 1.0, "prompted": reference})
    line = re.search(r'<line class="prompted-rel"[^>]*y1="([\d.]+)"[^>]*stroke-dasharray', svg)
    ppl = re.search(r'<line class="prompted-ppl"[^>]*y1="([\d.]+)"', svg)
    assert line and ppl and 'class="legend-prompted"' in svg and "prompted (unsteered, asked)" in svg
    assert re.search(r'class="prompted-rel-label"[^>]*>prompted 3.2<', svg)
    assert re.search(r'class="prompted-ppl-label"[^>]*>prompted 200<', svg)
    # each line lies inside its own panel, with the axes stretched to hold it (3.2 > every row, 200 > 30)
    assert plots.REL_TOP <= float(line.group(1)) <= plots.REL_TOP + plots.PANEL
    assert plots.PPL_TOP <= float(ppl.group(1)) <= plots.PPL_TOP + plots.PANEL
    assert max(float(t) for t in re.findall(r'class="rel-tick"[^>]*>([^<]*)<', svg)) >= 3.2
    assert max(float(t) for t in re.findall(r'class="ppl-tick"[^>]*>([^<]*)<', svg)) >= 200
    # the table ends with the reference row; the info line says no fluent coefficient beat asking
    result = {"rows": rows, "recommended": 1.0, "prompted": reference}
    assert views.sweep_table(result)[-1][:3] == ["prompted", "", "Dogs are loyal."]
    assert "no fluent coefficient was more relevant than asking" in views.sweep_prompted_line(result)
    reference["relevance"] = 0.3
    assert "more relevant at coefficients 0.5, 1" in views.sweep_prompted_line(result)
    unscored = plots.sweep_svg({"rows": rows, "prompted": {"text": "partial", "instruction": "x"}})
    assert "prompted-rel" not in unscored  # still generating: no line yet


def test_autotune_picture_and_cosine_scale():
    from steering.ui import plots

    result = {
        "layer": 15,
        "coeff": 0.4,
        "reason": "most relevant fluent row",
        "rows": [
            {"layer": 15, "coeff": 0.4, "score": 1.2, "text": "a"},
            {"layer": 15, "coeff": 0.6, "score": None, "text": "b"},
            {"layer": 18, "coeff": 0.4, "score": 0.3, "text": "c"},
        ],
    }
    grid = plots.autotune_html(result)
    assert grid.count('class="chosen"') == 1 and "not fluent" in grid and "colour-scale" in grid
    assert "layer 18" in grid and "Most relevant fluent row" in grid and "Score per layer × coefficient" in grid
    one_layer = plots.autotune_html({**result, "rows": result["rows"][:2]})
    assert "Score per coefficient at layer 15" in one_layer and "layer \\ coeff" not in one_layer
    assert "colour-scale" in views.heatmap_html(["a", "b"], [[1.0, 0.2], [0.2, 1.0]], 3)


def _cells(svg: str) -> list[tuple[str, str, str]]:
    """(class, fill, number) of every cell of a grid SVG."""
    return re.findall(
        r'<g class="(cell|chosen)">.*?<rect [^>]*fill="([^"]+)"[^>]*/><text class="cell-value"[^>]*>([^<]*)</text>', svg
    )


def test_heatmap_and_autotune_grid_are_svg_plots_with_a_numbered_scale_and_readable_numbers():
    from steering.ui import plots

    texts = ["dogs", "cats", "the Golden Gate Bridge at sunset"]
    matrix = [[1.0, 0.62, -0.9], [0.62, 1.0, 0.05], [-0.9, 0.05, 1.0]]
    svg = views.heatmap_html(texts, matrix, 15)
    assert "<svg" in svg and "<table" not in svg and "<td" not in svg  # a plot, not an HTML table
    cells = _cells(svg)
    assert [n for _, _, n in cells] == [f"{v:.2f}" for row in matrix for v in row]  # every cosine, in order

    def contrast(a: str, b: str) -> float:  # the WCAG contrast ratio of two colours
        high, low = sorted((plots._luminance(a), plots._luminance(b)), reverse=True)
        return (high + 0.05) / (low + 0.05)

    drawn = {}
    for _, fill, number in cells:  # black on light cells, white on dark ones: the better contrast, >= 4.5:1
        text = re.search(rf'fill="{re.escape(fill)}"[^>]*/><text class="cell-value"[^>]*fill="([^"]+)"', svg).group(1)
        other = "#000" if text == "#fff" else "#fff"
        assert contrast(text, fill) >= max(4.5, contrast(other, fill)), (number, fill, text)
        drawn[number] = text
    assert drawn["1.00"] == "#fff" and drawn["0.05"] == "#000" and drawn["-0.90"] == "#000"  # pure blue, white, red
    # the scale: a gradient bar from red (-1) through white to blue (+1), with its numbers
    assert 'class="scale-bar"' in svg and "linearGradient" in svg
    assert re.findall(r'class="scale-tick"[^>]*>([^<]*)<', svg) == ["-1", "-0.5", "0", "0.5", "1"]
    assert 'stop-color="rgb(255,0,0)"' in svg and 'stop-color="rgb(0,0,255)"' in svg
    # readable axis labels: every text on both axes (long ones shortened, the whole text as a tooltip)
    rows = re.findall(r'class="row-label"[^>]*><title>([^<]*)</title>([^<]*)<', svg)
    assert [full for full, _ in rows] == texts and rows[2][1] == "the Golden Gate Bridg…"
    assert len(re.findall(r'class="col-label"', svg)) == 3 and "steering vector" in svg

    result = {
        "layer": 15,
        "coeff": 1.0,
        "reason": "fluent on 4 of 5",
        "rows": [
            {"layer": layer, "coeff": c, "score": score, "text": "x"}
            for layer, c, score in ((12, 0.75, 0.4), (12, 1.0, None), (15, 0.75, 2.2), (15, 1.0, 2.9))
        ],
    }
    grid = plots.autotune_html(result)
    assert "<svg" in grid and "<table" not in grid
    cells = _cells(grid)
    assert [(k, n) for k, _, n in cells] == [
        ("cell", "0.400"), ("cell", "not fluent"), ("cell", "2.200"), ("chosen", "2.900")
    ]  # fmt: skip
    assert dict((n, f) for _, f, n in cells)["not fluent"] == plots.NOT_FLUENT
    darkest = re.search(r'<g class="chosen">.*?<text class="cell-value"[^>]*fill="([^"]+)"', grid).group(1)
    assert darkest == plots.text_colour(plots._score_colour(2.9, 2.9)) == "#000"  # 5.2:1 on the best green (white: 4.0)
    assert re.findall(r'class="scale-tick"[^>]*>([^<]*)<', grid) == ["0", "1", "2"]  # 0 .. the best score, 2.9
    assert 'class="scale-extra"' in grid and "not fluent" in grid  # the grey swatch beside the bar
    assert re.findall(r'class="row-label"[^>]*><title>[^<]*</title>([^<]*)<', grid) == ["layer 12", "layer 15"]
    assert re.findall(r'class="col-label"[^>]*>([^<]*)<', grid) == ["0.75", "1"] and "coefficient" in grid
    assert plots.text_colour("rgb(0,0,255)") == "#fff" and plots.text_colour("#ffffff") == "#000"


def test_history_is_bounded_per_session_and_downloads_as_jsonl(monkeypatch):
    from steering import history

    monkeypatch.setattr(history, "MAX_SESSIONS", 2)
    for session in ("a", "b"):
        history.clear(session)
    request = {"prompt": "Hi", "vectors": [{"text": "dogs", "coeff": 0.5, "layer": 15}], "seed": 3}
    for i in range(history.MAX_ENTRIES + 5):
        history.record("a", "steer", {**request, "direction": list(range(5000))}, {"model": "m", "steered": f"{i}"})
    entries = history.entries("a")
    assert len(entries) == history.MAX_ENTRIES and entries[-1]["result"]["steered"] == f"{history.MAX_ENTRIES + 4}"
    assert entries[0]["request"]["direction"] == "<5000 numbers, not kept>"  # large lists are not kept whole
    assert entries[0]["seed"] == 3 and entries[0]["vectors"][0]["text"] == "dogs" and "torch" in entries[0]["versions"]
    lines = history.to_jsonl("a").splitlines()
    assert len(lines) == history.MAX_ENTRIES and json.loads(lines[0])["kind"] == "steer"
    assert history.table_rows("a")[0][0] == history.MAX_ENTRIES  # newest first, numbered from 1
    history.record("b", "sweep", {"prompt": "Hi", "text": "dogs", "layer": 15, "seed": 0}, {"rows": []})
    history.record("c", "autotune", {"prompt": "Hi", "text": "dogs", "seed": 0}, {"layer": 15, "coeff": 0.4})
    assert history.entries("a") == []  # the least recently used session went first
    assert history.entries("b")[0]["vectors"] == [{"text": "dogs", "layer": 15}]
    with pytest.raises(ValueError, match="from 1 to 1"):
        history.entry("c", 2)


def test_sweep_streams_rows_records_history_and_reruns_the_same(embedded_dir):
    from steering import history

    ensure_embedded_loaded()
    history.clear(None)
    updates = list(ui_sweep.run_sweep("Tell me about your weekend.", "dogs", 15, "0, 0.45", 4, 0))
    assert any("generating" in info for _, _, info in updates[:-1])  # rows streamed before the scores
    progress = [int(m.group(1)) for *_, info in updates[:-1] if (m := re.search(r"\((\d+) of 4 tokens\)", info))]
    assert progress and progress == sorted(progress) and 1 <= progress[-1] <= 4  # in tokens, not characters
    table, plot, info = updates[-1]
    assert [row[0] for row in table] == [0.0, 0.45] and all(row[4] in ("yes", "no") for row in table)
    assert plot.count('class="marker"') >= 3 and "layer 15" in info
    (entry,) = history.entries(None)
    assert entry["kind"] == "sweep" and entry["model"] == "SmolLM2-135M-Instruct" and entry["request"]["coeffs"]
    assert (entry["quant"], entry["capture_mode"], entry["seed"]) == ("fp32", "contexts", 0)
    rows, result, message = ui_history.rerun_entry(1)
    assert "the output is the same" in message and [r["text"] for r in result["rows"]] == [r[2] for r in table]
    assert rows[0][0] == 2 and rows[0][2] == "sweep"
    assert _refusal(ui_history.rerun_entry(7)).startswith("entry: give an entry number from 1 to 2")
    updates = list(ui_sweep.run_sweep("Hi", "dogs", 15, "0, lots", 6, 0))
    assert _refusal(updates[-1]).startswith("coeffs: ")  # the previous sweep's table and plot stay


def test_autotune_fills_the_forms_layer_and_coefficient_and_is_kept(embedded_dir):
    from steering import history

    ensure_embedded_loaded()
    history.clear(None)
    assert _refusal(ui_autotune.autotune_form("Hi", " ", "", "", 0)).startswith("text: type the steering text")
    search = {"layers": [12, 15], "max_new_tokens": 12}  # a small search: the test's time, not the default's
    layer, coeff, picture, message = ui_autotune.autotune_form(
        "Tell me about your weekend.", "dogs", "", "", 0, **search
    )
    (entry,) = history.entries(None)
    result = entry["result"]
    assert entry["kind"] == "autotune" and result["rows"]
    if result["layer"] is None:  # nothing fluent and relevant: the form is left alone and the reason shown
        assert _skipped(layer) and _skipped(coeff) and message.startswith("⚠️ ")
    else:
        assert layer.value == result["layer"] and coeff == result["coeff"]
        assert f"layer {result['layer']} and coefficient {result['coeff']:g}" in message
    cells = picture.count('<g class="cell">') + picture.count('<g class="chosen">')
    assert "autotune-grid" in picture and "<svg" in picture and cells == len(result["rows"])
    if result["layer"] is not None:  # the message says whether the chosen setting beat asking in words
        assert result["versus_prompted"]["verdict"] in message


def test_stop_reaches_a_queued_run_and_a_stopped_run_leaves_the_next_runs_buttons_alone(embedded_dir):

    ensure_embedded_loaded()
    session = "stop-test"
    request = type("Request", (), {"session_hash": session})()
    args = ("Hi", [], 15, 4, 0.0, 1.0, 0, "bos-neutral", False, None)
    first = ui_steer.runs.begin(session)  # clicked, still queued
    line, generate_btn, stop_btn = ui_steer.stop_run(request)
    assert (
        line == "Stopped before the model started (no tokens generated)."
        and generate_btn.interactive
        and not stop_btn.interactive
    )
    second = ui_steer.runs.begin(session)  # Generate clicked again before the stopped run got its turn
    stale = list(ui_steer.generate_run(*args, first, request))
    assert all(_skipped(v) for out in stale for v in out)  # no model work, no line, the new run's buttons kept
    outputs = list(ui_steer.generate_run(*args, second, request))
    steered, baseline, line, *_, generate_btn, stop_btn = outputs[-2]
    assert steered and line.endswith("seed 0") and "4 tokens" in line
    *_, generate_btn, stop_btn = outputs[-1]
    assert generate_btn.interactive and stop_btn.interactive is False  # the latest run ends its own chain


def test_similarity_and_vector_files_refuse_beside_the_field(embedded_dir, tmp_path):
    ensure_embedded_loaded()
    assert _refusal(ui_vectors.show_similarity([["dogs", "", "", 0.5, 15, True]], 15)).startswith("texts: ")
    heatmap, message = ui_vectors.show_similarity(
        [["dogs", "", "", 0.5, 15, True], ["cats", "", "", 0.5, 15, True]], 15
    )
    assert "colour-scale" in heatmap and "dogs" in heatmap and message == ""
    heatmap, _ = ui_vectors.show_similarity([["dogs", "", "", 0.5, 15, True], ["", "happy", "sad", 0.5, 15, True]], 15)
    assert "happy − sad" in heatmap  # a pair is one row: its difference vector
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a control vector")
    assert _refusal(ui_steer.import_into_table(str(junk), [["dogs", "", "", 0.5, 15, True]], {}, 15))
    assert _refusal(ui_steer.export_table_shown([["dogs", "", "", 0.5, 1, True]], 15, "gguf", "bos-neutral", {}))


def test_model_advice_gives_an_offload_models_speed_and_load_takes_allow_offload(embedded_dir):
    ensure_embedded_loaded()
    with gpu.use_nvml(gpu.simulate_gpu(8 * gpu.GiB, int(0.7 * gpu.GiB))):
        offload = ui_model.model_advice("mistralai/Mistral-7B-Instruct-v0.3", "fp16")
        fits = ui_model.model_advice("Qwen/Qwen2.5-1.5B-Instruct", "auto")
    assert "tokens/s" in offload and "Allow offload" in offload and "CPU RAM" in offload
    assert fits == ""  # "auto" takes a quantization that fits: nothing to say
    demo = ui.build_demo()
    load = next(fn for fn in demo.fns.values() if fn.fn is not None and fn.name == "load_selected_model")
    offload_box = load.inputs[-1]
    assert (offload_box.label, offload_box.info) == ("Allow offload", "layers in CPU RAM: much slower")
    view = ui_model.load_selected_model(catalog.EMBEDDED_ID, "auto", False, True)  # a model that fits: loads as usual
    assert view[-1] == "" and get_manager().status()["model"] == catalog.EMBEDDED_ID


def test_prompted_run_shows_three_rows_scored_and_the_best_row_and_is_kept(embedded_dir):
    from steering import history

    ensure_embedded_loaded()
    session = "prompted-test"
    request = type("Request", (), {"session_hash": session})()
    history.clear(session)
    rows = [["the ocean", "", "", 1.0, 15, True, "prompt"]]
    args = ("What should I do this weekend?", rows, 15, 12, 0.0, 1.0, 0, "contexts", False, None)
    outputs = list(ui_steer.generate_run(*args, ui_steer.runs.begin(session), request, prompted=True))
    steered, baseline, line, prompted, *badges, best, _, _ = outputs[-2]
    assert steered and baseline and prompted and prompted != baseline
    assert all("concept" in b and "instruction" in b and "fluency" in b and "score " in b for b in badges)
    assert "concept 0 (+0.00)" in badges[1]  # the baseline's concept is 0 by construction
    assert re.search(r"(scored highest|tied at|no row scored above 0)", best)
    assert "prompted with “In your answer, talk about the ocean.”" in best
    (entry,) = history.entries(session)
    assert entry["request"]["prompted"] is True and entry["result"]["prompted"] == prompted
    _, result, note = ui_history.rerun_entry(1, request)
    assert result["prompted"] == prompted and note.endswith("the output is the same.")
    # without the option: no prompted row, but the two rows are still scored
    outputs = list(ui_steer.generate_run(*args, ui_steer.runs.begin(session), request))
    steered_again, _, _, prompted_off, *badges_off, best_off, _, _ = outputs[-2]
    assert steered_again == steered and prompted_off is None and badges_off[2] == "" and badges_off[0]
    assert "prompted with" not in best_off
    assert ui_steer.show_prompted(True).visible is True and ui_steer.show_prompted(False).visible is False


def test_score_badges_show_bins_and_the_best_row_line():
    def score(concept, bins, aggregate):
        return {"concept": concept, "instruction": 1.2, "perplexity": 6.0, "repetition": 0.0, "fluent": True,
                "bins": dict(zip(("concept", "instruction", "fluency"), bins)), "aggregate": aggregate}  # fmt: skip

    result = {
        "instruction": "In your answer, talk about cats.",
        "scores": {
            "steered": score(0.3, (1, 2, 2), 1.5),
            "baseline": score(0.0, (0, 2, 2), 0.0),
            "prompted": score(0.9, (2, 2, 2), 2.0),
        },
    }
    steered, baseline, prompted, line = views.steer_scores(result)
    assert "concept 1 (+0.30)" in steered and "score 1.50/2" in steered and "<table" not in steered
    assert "score 0.00/2" in baseline and "score 2.00/2" in prompted
    assert line.startswith("prompted scored highest: 2.00 of 2")
    assert views.steer_scores({"scores": None}) == ("", "", "", "")


def test_strength_hint_names_a_repeated_vector_and_a_strength_far_above_the_usual():
    not_fluent = {"scores": {"steered": {"fluent": False}}}
    twice = [["ocean", "", "", 1, 15, True, "prompt"], ["ocean", "", "", 1, 15, True, "prompt"]]
    hint = views.strength_hint(twice, 15, not_fluent)
    assert "rows 1 and 2 are the same vector" in hint and "add up" in hint
    strong = [["ocean", "", "", 20, 15, True, "prompt"]]
    hint = views.strength_hint(strong, 15, not_fluent)
    assert "layer 15 gets strength 20" in hint and "try 1" in hint and "same vector" not in hint
    assert "try 0.45" in views.strength_hint([["ocean", "", "", 2, 15, True, "all"]], 15, not_fluent)
    # No hint for a fluent text, a usual strength, a disabled twin, or an answer without scores.
    assert views.strength_hint(strong, 15, {"scores": {"steered": {"fluent": True}}}) == ""
    assert views.strength_hint([["ocean", "", "", 1, 15, True, "prompt"]], 15, not_fluent) == ""
    assert views.strength_hint([twice[0], ["ocean", "", "", 1, 15, False, "prompt"]], 15, not_fluent) == ""
    assert views.strength_hint(strong, 15, {"steered": "x"}) == ""


def test_a_rerun_shows_texts_for_every_kind_of_entry():
    steer = {"steered": "waves", "baseline": "hello", "prompted": None}
    assert views.rerun_texts(steer) == ("Steered", "waves", "hello", None)
    assert views.rerun_texts({**steer, "prompted": "sea"})[3] == "sea"
    rows = [{"coeff": 0.0, "text": "hi"}, {"coeff": 0.5, "text": "sea"}]
    sweep = {"rows": rows, "recommended": 0.5, "prompted": {"text": "ocean"}}
    assert views.rerun_texts(sweep) == ("Sweep rows", "coeff 0: hi\n\ncoeff 0.5: sea", "", "ocean")
    tuned = {"layer": 15, "coeff": 1.0, "reason": "fluent on 5 of 5", "rows": [{"layer": 15, **rows[1]}]}
    label, text, baseline, prompted = views.rerun_texts(tuned)
    assert label == "Auto-tune candidates" and text.startswith("chosen: layer 15, coeff 1.0 (fluent on 5 of 5)")
    assert text.endswith("layer 15, coeff 0.5: sea") and (baseline, prompted) == ("", None)


def _fake_cached_model(cache: Path, repo_id: str, files: tuple[str, ...]) -> None:
    """The Hugging Face cache's layout for `repo_id` at one revision, holding `files` (empty)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for name in files:
        (snapshot / name).write_text("{}")


def test_offline_model_choices_mark_what_is_not_downloaded(tmp_path):
    cache = tmp_path / "hub"
    _fake_cached_model(cache, "Qwen/Qwen2.5-1.5B-Instruct", ("config.json", "model.safetensors"))
    _fake_cached_model(cache, "Qwen/Qwen2.5-7B-Instruct", ("config.json",))  # no weights: not usable
    script = (
        "import json; from steering.ui import views; "
        "print(json.dumps([views.model_choices(), views.model_choices(online=lambda: True)]))"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True, cwd=ROOT)
    offline, online = (dict((i, label) for label, i in pairs) for pairs in json.loads(out.stdout.splitlines()[-1]))
    assert offline["Qwen/Qwen2.5-1.5B-Instruct"] == "Qwen2.5-1.5B-Instruct"  # cached: plain
    assert offline["SmolLM2-135M-Instruct"] == "SmolLM2-135M-Instruct (embedded)"
    assert offline["Qwen/Qwen2.5-7B-Instruct"] == "Qwen2.5-7B-Instruct — not downloaded (offline)"
    assert offline["mistralai/Mistral-7B-Instruct-v0.3"] == "Mistral-7B-Instruct-v0.3 — not downloaded (offline)"
    assert list(offline) == [spec.id for spec in catalog.CATALOG]  # same ids, same order: values unchanged
    assert all("not downloaded" not in label for label in online.values())  # the hub reachable: plain names


def test_the_autotune_message_says_whether_the_chosen_setting_beat_prompting():
    verdict = (
        "Prompting beat the chosen setting on your prompt and the 4 probes: mean aggregate score 0.4 steered vs 1.2."
    )
    result = {
        "layer": 15,
        "coeff": 1.0,
        "reason": "fluent on 4 of 5",
        "rows": [{"layer": 15, "coeff": 1.0, "score": 2.5, "text": "x"}],
        "versus_prompted": {"verdict": verdict, "steered": 0.4, "prompted": 1.2},
    }
    message = ui_autotune._message(result, 15)
    assert verdict in message and message.index(verdict) < message.index("Add vector")
    assert "Prompting beat" not in ui_autotune._message({**result, "versus_prompted": None}, 15)
