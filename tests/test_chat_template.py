"""The recipe key ``chat_template`` (evomerge.chat_template): the built-in templates render as
mergekit 0.1.5's, ``evomerge merge`` writes the tokenizer mergekit writes, bad values get one line,
and ``export`` keeps the key."""

from __future__ import annotations

import itertools
import json
import shutil
import tomllib
from pathlib import Path

import optuna
import pytest
import yaml
from click.testing import CliRunner

from conftest import CHAT_TEMPLATE, _tiny_tokenizer, load_state, one_line_error
from evomerge.chat_template import BUILTIN, TEMPLATE_DIR, resolve_chat_template
from evomerge.checkpoint import TOKENIZER_FILES
from evomerge.cli import main
from evomerge.errors import ConfigError
from evomerge.recipe import Recipe
from evomerge.study import ATTR_RECIPE, ATTR_ROOT, ATTR_SCORES

ROOT = Path(__file__).resolve().parents[1]
OTHER = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>\n{% endfor %}"
INLINE = "{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}\n{% endfor %}"

S = {"role": "system", "content": " Be brief. "}
U = {"role": "user", "content": "Hi there\n"}
A = {"role": "assistant", "content": " Hello! "}
TYPICAL = 5
CONVERSATIONS = [  # TYPICAL ones, then edge cases (wrong order, other roles, empty content)
    [S, U], [S, U, A], [U, A, U], [U], [S, U, A, U, A],
    [U, {"role": "user_context", "content": "ctx"}], [U, S], [S], [A], [U, U], [S, A],
    [U, {"role": "tool", "content": "42"}], [S, S, U], [{"role": "user", "content": ""}],
]


def _mergekit_template(name: str) -> str:
    resources = pytest.importorskip("importlib.resources")
    templates = pytest.importorskip("mergekit._data.chat_templates")
    return resources.files(templates).joinpath(f"{name}.jinja").read_text()


def _renderings(template: str) -> list[str]:
    """``template`` applied (as transformers applies it) to every conversation, with and without a
    generation prompt; a template that refuses a conversation gives the exception's type."""
    tok = _tiny_tokenizer(64)
    tok.chat_template = template
    out = []
    for messages, prompt in itertools.product(CONVERSATIONS, (False, True)):
        try:
            out.append(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt))
        except Exception as exc:  # noqa: BLE001 - compared by type with the reference's
            out.append(type(exc).__name__)
    return out


# ----------------------------------------------------------------------------- built-in templates
def test_builtin_names_are_mergekits():
    pytest.importorskip("mergekit")
    import importlib.resources

    from mergekit._data import chat_templates

    theirs = {p.name.removesuffix(".jinja") for p in importlib.resources.files(chat_templates).iterdir()
              if p.name.endswith(".jinja")}
    assert set(BUILTIN) == theirs == {"alpaca", "chatml", "exaone", "llama3", "mistral"}


@pytest.mark.parametrize("name", ["alpaca", "chatml", "exaone", "llama3", "mistral"])
def test_builtin_template_renders_as_mergekits(name):
    ours = (TEMPLATE_DIR / f"{name}.jinja").read_text()
    theirs = _mergekit_template(name)
    assert ours != theirs  # our own text ...
    got, want = _renderings(ours), _renderings(theirs)
    assert got == want  # ... rendering every conversation the same
    assert not any(r.endswith("Error") for r in want[:2 * TYPICAL])  # the typical conversations render


def test_builtin_renderings_known_answers():
    """A few renderings spelled out, oddities of mergekit's templates included."""
    tok = _tiny_tokenizer(64)

    def render(name, messages, prompt=True):
        tok.chat_template = (TEMPLATE_DIR / f"{name}.jinja").read_text()
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)

    assert render("chatml", [S, U]) == "<|im_start|>system\n Be brief. <|im_end|>\n<|im_start|>user\nHi there\n<|im_end|>\n<|im_start|>assistant\n"
    # a newline after every <|eot_id|> (Meta's Llama 3 template has none)
    assert render("llama3", [S, U]) == ("<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\n"
                                        "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>\n"
                                        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert render("mistral", [S, U, A, U]) == "<s> [INST]  Be brief. \n\nHi there\n [/INST]  Hello! </s> [INST] Hi there\n [/INST]"
    # the generation prompt follows the last instruction without a blank line
    assert render("alpaca", [U]) == "\n\n### Instruction:\nHi there### Response:\n"
    # the indentation of mergekit's template source ends up in the text
    assert render("exaone", [U], prompt=False) == "        [|system|][|endofturn|]\n\n    [|user|]Hi there\n\n        \n\n"


def test_builtin_templates_are_package_data():
    """A wheel carries the templates: a package-data pattern of pyproject.toml matches each file."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["evomerge"]
    shipped = {p for pattern in data for p in (ROOT / "evomerge").glob(pattern)}
    assert {TEMPLATE_DIR / f"{name}.jinja" for name in BUILTIN} <= shipped


# ----------------------------------------------------------------------------- auto
def _tokenizer_folder(path: Path, template: str | None) -> Path:
    tok = _tiny_tokenizer(64)
    tok.chat_template = template
    tok.save_pretrained(path)
    return path


def test_auto_picks_the_plurality_stripped_template(tmp_path):
    folders = [("base", _tokenizer_folder(tmp_path / "base", CHAT_TEMPLATE)),
               ("a", _tokenizer_folder(tmp_path / "a", OTHER + "\n\n")),
               ("b", _tokenizer_folder(tmp_path / "b", "  " + OTHER)),
               ("none", _tokenizer_folder(tmp_path / "none", None)),
               ("broken", tmp_path / "missing")]
    assert resolve_chat_template("auto", folders) == OTHER.strip()


def test_auto_tie_goes_to_the_first_model_and_no_template_sets_none(tmp_path):
    base = ("base", _tokenizer_folder(tmp_path / "base", CHAT_TEMPLATE))
    other = ("a", _tokenizer_folder(tmp_path / "a", OTHER))
    assert resolve_chat_template("auto", [base, other]) == CHAT_TEMPLATE.strip()
    assert resolve_chat_template("auto", [other, base]) == OTHER.strip()
    assert resolve_chat_template("auto", [("none", _tokenizer_folder(tmp_path / "none", None))]) is None


# ----------------------------------------------------------------------------- merges against mergekit
@pytest.fixture(scope="module")
def templated_models(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """Copies of the tiny models whose tokenizers carry different templates: the base conftest's,
    a and b another (differing only in surrounding whitespace), so ``auto`` picks a's and b's."""
    root = tmp_path_factory.mktemp("templated")
    out = {}
    for name, template in (("base", CHAT_TEMPLATE), ("a", OTHER + "\n"), ("b", OTHER)):
        out[name] = Path(shutil.copytree(tiny_models[name], root / name))
        (out[name] / "chat_template.jinja").write_text(template)
    return out


def _recipe(m: dict[str, Path], chat_template: str, tokenizer_source: str | None) -> dict:
    recipe = {"merge_method": "ties", "base_model": str(m["base"]), "dtype": "float32",
              "models": [{"model": str(m["a"]), "parameters": {"weight": 0.6, "density": 0.5}},
                         {"model": str(m["b"]), "parameters": {"weight": [0.3, 0.8], "density": 0.7}}],
              "chat_template": chat_template}
    if tokenizer_source:
        recipe["tokenizer_source"] = tokenizer_source
    return recipe


@pytest.mark.parametrize("chat_template, tokenizer_source", [
    ("auto", None), ("chatml", None), ("llama3", "union"), (INLINE, None)], ids=["auto", "chatml", "llama3-union", "jinja"])
def test_merge_writes_the_template_mergekit_writes(templated_models, tmp_path, chat_template, tokenizer_source):
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    from transformers import AutoTokenizer

    recipe = _recipe(templated_models, chat_template, tokenizer_source)
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    res = CliRunner().invoke(main, ["merge", str(tmp_path / "r.yml"), str(ours)])
    assert res.exit_code == 0, res.output
    run_merge(MergeConfiguration.model_validate(recipe), str(theirs), options=MergeOptions(quiet=True))

    got, want = AutoTokenizer.from_pretrained(str(ours)), AutoTokenizer.from_pretrained(str(theirs))
    if chat_template in BUILTIN:  # our own template text, rendering as mergekit's
        assert got.chat_template == (TEMPLATE_DIR / f"{chat_template}.jinja").read_text()
        assert _renderings(got.chat_template) == _renderings(want.chat_template)
    else:
        assert got.chat_template == want.chat_template == (OTHER.strip() if chat_template == "auto" else INLINE)
    assert got.get_vocab() == want.get_vocab()
    # the template is stored once, in chat_template.jinja (as transformers 5 saves it): no donor's file left
    files = {p.name for p in ours.iterdir() if p.name in TOKENIZER_FILES}
    assert files == {p.name for p in theirs.iterdir() if p.name in TOKENIZER_FILES}
    assert "chat_template.jinja" in files and "chat_template.json" not in files
    assert "chat_template" not in json.loads((ours / "tokenizer_config.json").read_text())
    a, b = load_state(ours), load_state(theirs)
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).abs().max().item() <= 1e-6, name


# ----------------------------------------------------------------------------- bad values, export
@pytest.mark.parametrize("value, needle", [
    ("chatml2", "'chatml2'"),  # not a built-in name, not Jinja
    ("{{ x }}", "'{{ x }}'"),  # Jinja, but under 20 characters (mergekit refuses it too)
    ("a long text without any template syntax", "'a long text without"),
    ("auto\n", "'auto\\n'"),
])
def test_bad_chat_template_gets_one_line_before_writing(tiny_models, tmp_path, value, needle):
    recipe = {"merge_method": "linear", "models": [{"model": str(tiny_models["a"]), "parameters": {"weight": 1.0}}],
              "chat_template": value}
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    line = one_line_error(CliRunner().invoke(main, ["merge", str(tmp_path / "r.yml"), str(tmp_path / "out")]),
                          "chat_template: expected auto, a built-in template (alpaca, chatml, exaone, llama3, mistral)",
                          needle)
    assert line.startswith(f"error: {tmp_path / 'r.yml'}: chat_template:")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="chat_template: expected"):
        Recipe.from_dict(recipe)


def test_export_keeps_the_key_and_builds_it(tiny_models, tmp_path):
    template = (TEMPLATE_DIR / "llama3.jinja").read_text()  # several lines, some with trailing blanks
    recipe = {"merge_method": "linear", "dtype": "float32", "chat_template": template,
              "models": [{"model": str(tiny_models["a"]), "parameters": {"weight": 0.5}},
                         {"model": str(tiny_models["b"]), "parameters": {"weight": 0.5}}]}
    assert Recipe.from_dict(yaml.safe_load(Recipe.from_dict(recipe).to_yaml())).chat_template == template
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(study_name="s", storage=url, direction="maximize")
    study.set_user_attr(ATTR_ROOT, str(tmp_path))
    study.add_trial(optuna.create_trial(value=0.5, user_attrs={ATTR_RECIPE: recipe, ATTR_SCORES: {"t": 0.5}}))
    res = CliRunner().invoke(main, ["export", "--study", "s", "--storage", url, "-o", str(tmp_path / "best.yml"),
                                    "--merge", str(tmp_path / "merged")])
    assert res.exit_code == 0, res.output
    assert Recipe.from_yaml(tmp_path / "best.yml").chat_template == template
    assert "chat_template: |" in (tmp_path / "best.yml").read_text()  # a literal block, readable
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(tmp_path / "merged")).chat_template == template
