"""The ```python blocks of README.md and docs/**/*.md (docs/bench/ left out: the experiments' reports) tell the truth
to whoever copies them. The shell ``rankwise ...`` lines are tests/test_packaging.py's.

Every block, named ``page#n`` (its n-th python block) and reported by page and line:

1. compiles (a block marked ``<!-- fragment -->`` on the line above is exempt; none is today);
2. uses only names the library has: ``rankwise.a.b`` (a submodule only when ``import rankwise`` or the block's own
   import loads it, or the package's ``__getattr__`` does on first use, as ``rankwise.integrations.hf``),
   ``from rankwise[.sub] import X``, and every call of a rankwise or rankwise_harness function, class or method
   binds its arguments to the callee's ``inspect.signature`` (keyword names, positional count, required arguments);
3. names nothing it does not define but the reader's own objects, listed for it in ``GIVEN`` (a missing import
   fails here, also in a block that cannot run);
4. runs, where it can offline: in a temporary working directory, with transformers' ``Auto*.from_pretrained``
   redirected to tiny random models (a 2-layer BERT classifier, a 2-layer Llama causal LM) and a tiny WordPiece
   tokenizer, so ``bert-base-uncased`` or ``meta-llama/...`` costs nothing, and tiny stand-ins for the ``GIVEN``
   objects. A warning from rankwise fails the run (e.g. a new classifier head left frozen: the tiny models mark their
   weights loaded, all but the head, as ``from_pretrained`` does). A block that only builds a config (``cfg = ...``)
   then attaches it to the tiny BERT its target names are written for. A block marked ``<!-- continues -->`` runs
   after the page's block before it. Without a GPU, TRL's ``DPOConfig`` / ``SFTConfig`` get ``use_cpu=True`` (their
   default ``bf16=True`` is refused on a CPU-only machine otherwise; the blocks are written for a GPU).

Blocks checked by 1-3 only (``STATIC_ONLY``):

- docs/distributed.md#1 (DDP): one process per GPU (gloo on CPU) under torchrun.
- docs/distributed.md#2 (FSDP2 save): a model sharded by FSDP2 over several processes.
  tests/test_review84_distributed_docs.py runs both as written on 2 gloo processes (``slow``).
- The blocks that include an example (``--8<-- "examples/x.py"``; the block's code is the file):
  docs/quickstart.md#1, docs/howto/trl.md#1, docs/howto/export.md#1, docs/howto/own-loop.md#1 and #2,
  docs/howto/hf-trainer.md#1, docs/howto/quantized.md#1, docs/methods/raclora.md#1, docs/methods/gora.md#1,
  docs/howto/new-tokens.md#1.
  tests/test_examples.py runs each of these files on its tiny model already.

The DPO block (docs/howto/adapters.md#2) runs TRL's ``DPOTrainer`` (3 steps; TRL's import is most of its
~25 s on 2 cores): ``slow``. A block importing a package that is not installed (trl, datasets, bitsandbytes, ...)
is skipped, naming it.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import inspect
import re
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("rankwise", "rankwise_harness")
PYTHON = {"python", "py", "python3"}

# the reader's own objects a block may name without defining them: block -> {name: what it stands for}
GIVEN: dict[str, dict[str, str]] = {
    "docs/distributed.md#1": {"load_base_model": "your model's loader",
                              "loader": "your batches (a DistributedSampler's)"},
    "docs/distributed.md#2": {"load_base_model": "your model's loader", "model": "the FSDP2-sharded model",
                              "cfg": "the config it was attached with"},
    "docs/howto/adapters.md#2": {"pairs": "your preference dataset (prompt, chosen, rejected)"},
    "docs/raclora.md#1": {"loader": "your batches"},
}
STATIC_ONLY: dict[str, str] = {
    "docs/distributed.md#1": "one process per GPU (gloo on CPU) under torchrun; run by test_review84 (slow)",
    "docs/distributed.md#2": "a model sharded by FSDP2 over several processes; run by test_review84 (slow)",
}
SLOW = {"docs/howto/adapters.md#2"}  # TRL's DPOTrainer: its import and 3 steps


# ---------------------------------------------------------------------------------------------- the blocks
@dataclasses.dataclass(frozen=True)
class Block:
    page: str  # relative to the repository root
    n: int  # the n-th python block of the page
    line: int  # the line of its opening fence
    code: str
    marks: frozenset[str]  # words of an HTML comment on the line above: fragment, continues
    include: str | None  # the example file a ``--8<--`` line includes (the block's whole code)

    @property
    def key(self) -> str:
        return f"{self.page}#{self.n}"

    @property
    def origin(self) -> tuple[str, int]:
        """The file and line offset a line number of ``code`` is reported against."""
        return (self.include, 0) if self.include else (self.page, self.line)

    def at(self, lineno: int) -> str:
        file, offset = self.origin
        return f"{file}:{offset + lineno}"


FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<lang>[^\s`{]*)")
SNIPPET = re.compile(r"""^\s*-+8<-+\s+["']([^"']+)["']\s*$""")
MARK = re.compile(r"^\s*<!--\s*(.*?)\s*-->\s*$")


def _pages() -> list[Path]:
    docs = ROOT / "docs"
    return [ROOT / "README.md", *sorted(p for p in docs.rglob("*.md") if p.relative_to(docs).parts[0] != "bench")]


def _blocks_of(page: Path) -> Iterator[Block]:
    lines = page.read_text().splitlines()
    n, i = 0, 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent = m["fence"], len(m["indent"])
        close = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        j = i + 1
        while j < len(lines) and not close.match(lines[j]):
            j += 1
        if m["lang"].lower() in PYTHON:
            n += 1
            body = [line[indent:] if line[:indent].strip() == "" else line.lstrip() for line in lines[i + 1:j]]
            before = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
            mark = MARK.match(before)
            snippets = [SNIPPET.match(line) for line in body]
            includes = [s[1] for s in snippets if s]
            code = "\n".join((ROOT / s[1]).read_text() if s else line for line, s in zip(body, snippets))
            yield Block(str(page.relative_to(ROOT)), n, i + 1, code + "\n",
                        frozenset(mark[1].split()) if mark else frozenset(),
                        includes[0] if len(includes) == 1 and len([b for b in body if b.strip()]) == 1 else None)
        i = j + 1


@functools.cache
def all_blocks() -> tuple[Block, ...]:
    return tuple(b for page in _pages() for b in _blocks_of(page))


BLOCKS = all_blocks()
BY_KEY = {b.key: b for b in BLOCKS}


def _with_predecessors(block: Block) -> list[Block]:
    """The block, after those it continues (``<!-- continues -->``: the page's block before it, and so on)."""
    chain = [block]
    while "continues" in chain[0].marks and chain[0].n > 1:
        chain.insert(0, BY_KEY[f"{block.page}#{chain[0].n - 1}"])
    return chain


def _tree(block: Block) -> ast.Module:
    try:
        return ast.parse(block.code)
    except SyntaxError as exc:
        pytest.fail(f"{block.at(exc.lineno or 0)}: {exc.msg}")


def _needs(block: Block) -> None:
    """Skip when a package the block imports (other than the library) is not installed."""
    for node in ast.walk(_tree(block)):
        roots = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
        for root in (r.split(".")[0] for r in roots):
            if root not in LIBRARIES and importlib.util.find_spec(root) is None:
                pytest.skip(f"{block.key} imports {root}, which is not installed")


def test_the_blocks_are_found_and_the_lists_name_only_blocks_that_exist() -> None:
    assert len(BLOCKS) >= 15, [b.key for b in BLOCKS]
    assert any(b.page == "README.md" for b in BLOCKS)
    assert not any(b.page.startswith("docs/bench/") for b in BLOCKS)
    stale = [k for k in [*GIVEN, *STATIC_ONLY, *SLOW] if k not in BY_KEY]
    assert not stale, f"listed here but no such block (a page changed; update the lists): {stale}"
    included = [b.key for b in BLOCKS if b.include]
    for key in [*STATIC_ONLY, *included]:  # the module's docstring says which blocks do not run here, and why
        page, n = key.split("#")
        assert key in __doc__ or f"{page}#{int(n) - 1} and #{n}" in __doc__, f"{key} missing from the docstring"


# ---------------------------------------------------------------------------------------------- 1. compiles
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.key)
def test_block_compiles(block: Block) -> None:
    if "fragment" in block.marks:
        pytest.skip("marked <!-- fragment -->")
    file, offset = block.origin
    try:
        compile("\n" * offset + block.code, file, "exec")
    except SyntaxError as exc:
        pytest.fail(f"{file}:{exc.lineno}: {exc.msg}: {(exc.text or '').strip()}")


# ------------------------------------------------------------------------------------- 2. library names and calls
@functools.cache
def loaded_by_import(package: str) -> frozenset[str]:
    """The submodules a bare ``import package`` loads, in a fresh interpreter (this one may have imported more)."""
    out = subprocess.run([sys.executable, "-c", f"import sys, {package}; print(*sorted(sys.modules))"],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return frozenset(m for m in out.split() if m == package or m.startswith(package + "."))


@functools.cache
def reachable_after_import(root: str, name: str) -> bool:
    """Whether the dotted ``name`` resolves after a bare ``import root`` in a fresh interpreter (a submodule the
    package imports itself, or one its PEP 562 ``__getattr__`` imports on first use)."""
    code = f"import {root}, functools; functools.reduce(getattr, {name.split('.')[1:]!r}, {root})"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=ROOT).returncode == 0


@dataclasses.dataclass(frozen=True)
class Instance:
    cls: type


def _ours(obj: object) -> bool:
    module = obj.__name__ if inspect.ismodule(obj) else getattr(obj, "__module__", None) or ""
    return module.split(".")[0] in LIBRARIES


class LibraryUse(ast.NodeVisitor):
    """Resolves the block's names that come from the library, in source order, and records what does not exist or
    does not bind to its signature."""

    def __init__(self, block: Block) -> None:
        self.block = block
        self.env: dict[str, Any] = {}  # name -> module, class, function, or Instance of a library class
        self.imported: set[str] = set()  # modules the block imports itself
        self.problems: dict[str, None] = {}  # ordered, without repeats

    def problem(self, node: ast.AST, text: str) -> None:
        self.problems[f"{self.block.at(getattr(node, 'lineno', 0))}: {text}"] = None

    # -- bindings
    def imported_module(self, node: ast.AST, name: str, spelled: str) -> Any:
        """Module ``name`` as the block imports it (``None``, a problem noted, when it cannot be imported); it and
        its parent packages count as imported."""
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            self.problem(node, f"`{spelled}`: {exc}")
            return None
        parts = name.split(".")
        self.imported.update(".".join(parts[: i + 1]) for i in range(len(parts)))
        return module

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.split(".")[0] not in LIBRARIES:
                self.env.pop(alias.asname or alias.name.split(".")[0], None)
                continue
            module = self.imported_module(node, alias.name, f"import {alias.name}")
            if module is not None:
                self.env[alias.asname or alias.name.split(".")[0]] = (
                    module if alias.asname else importlib.import_module(alias.name.split(".")[0]))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level or not node.module or node.module.split(".")[0] not in LIBRARIES:
            for alias in node.names:
                self.env.pop(alias.asname or alias.name, None)
            return
        module = self.imported_module(node, node.module, f"from {node.module} import ...")
        if module is None:
            return
        for alias in node.names:
            if alias.name == "*":
                continue
            if hasattr(module, alias.name):
                obj = getattr(module, alias.name)
            elif importlib.util.find_spec(f"{node.module}.{alias.name}") is not None:
                obj = importlib.import_module(f"{node.module}.{alias.name}")
            else:
                self.problem(node, f"`from {node.module} import {alias.name}`: {node.module} has no {alias.name!r}")
                continue
            self.env[alias.asname or alias.name] = obj

    def _bind(self, target: ast.AST, value: Any) -> None:
        if isinstance(target, ast.Name):
            if value is None:
                self.env.pop(target.id, None)
            else:
                self.env[target.id] = value
        elif isinstance(target, (ast.Tuple, ast.List)):
            for element in target.elts:
                self._bind(element, None)

    def visit_Assign(self, node: ast.Assign) -> None:
        self.visit(node.value)
        value = self.resolve(node.value)
        for target in node.targets:
            self._bind(target, value)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)
            self._bind(node.target, self.resolve(node.value))

    def visit_For(self, node: ast.For) -> None:
        self.visit(node.iter)
        self._bind(node.target, None)
        for stmt in [*node.body, *node.orelse]:
            self.visit(stmt)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self.env.pop(node.name, None)
        self.generic_visit(node)

    # -- uses
    def _attribute(self, base: Any, attr: str, node: ast.AST) -> Any:
        if isinstance(base, Instance):
            if hasattr(base.cls, attr):
                found = getattr(base.cls, attr)
                return functools.partial(found, None) if inspect.isfunction(found) else None  # a method: self bound
            if dataclasses.is_dataclass(base.cls) and attr not in {f.name for f in dataclasses.fields(base.cls)}:
                self.problem(node, f"an instance of {base.cls.__name__} has no attribute {attr!r}")
            return None
        if inspect.ismodule(base):
            name = f"{base.__name__}.{attr}"
            root = base.__name__.split(".")[0]
            is_submodule = importlib.util.find_spec(name) is not None if hasattr(base, "__path__") else False
            if (is_submodule and name not in loaded_by_import(root) | self.imported
                    and not reachable_after_import(root, name)):
                self.problem(node, f"`{name}` is not loaded by `import {root}`: import it (`import {name}` or "
                                   f"`from {name} import ...`)")
                return importlib.import_module(name)
            if not hasattr(base, attr):
                self.problem(node, f"{base.__name__} has no attribute {attr!r}")
                return None
            return getattr(base, attr)
        if inspect.isclass(base):
            if not hasattr(base, attr):
                self.problem(node, f"{base.__name__} has no attribute {attr!r}")
                return None
            return getattr(base, attr)
        return None

    def resolve(self, node: ast.AST) -> Any:
        """What ``node`` is, when it is a library object (or an instance of a library class); else None."""
        if isinstance(node, ast.Name):
            return self.env.get(node.id)
        if isinstance(node, ast.Attribute):
            base = self.resolve(node.value)
            return None if base is None else self._attribute(base, node.attr, node)
        if isinstance(node, ast.Call):
            callee = self.resolve(node.func)
            if inspect.isclass(callee) and _ours(callee):
                return Instance(callee)
            if callable(callee) and _ours(getattr(callee, "func", callee)):
                returned = inspect.signature(callee).return_annotation
                with contextlib.suppress(Exception):
                    function = getattr(callee, "func", callee)
                    returned = inspect.get_annotations(function, eval_str=True).get("return", returned)
                    if isinstance(returned, str):  # -> "Name" under ``from __future__ import annotations``
                        returned = eval(returned, vars(sys.modules[function.__module__]))
                if inspect.isclass(returned) and _ours(returned):
                    return Instance(returned)
        return None

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self.resolve(node)  # records a missing name
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        self.generic_visit(node)
        callee = self.resolve(node.func)
        target = getattr(callee, "func", callee)  # a method of an instance: functools.partial(method, self)
        if callee is None or isinstance(callee, Instance) or not callable(callee) or not _ours(target):
            return
        try:
            signature = inspect.signature(callee)
        except (TypeError, ValueError):
            return
        name = getattr(target, "__qualname__", repr(target))
        keywords = [k.arg for k in node.keywords if k.arg is not None]
        if any(isinstance(a, ast.Starred) for a in node.args) or len(keywords) < len(node.keywords):
            params = signature.parameters
            takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
            for k in keywords:
                if not takes_any and (k not in params or params[k].kind is params[k].POSITIONAL_ONLY):
                    self.problem(node, f"{name}() takes no keyword {k!r}; its signature: {signature}")
            return
        try:
            signature.bind(*node.args, **dict.fromkeys(keywords))
        except TypeError as exc:
            self.problem(node, f"{name}{signature}: {exc}")


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.key)
def test_block_uses_only_what_the_library_has(block: Block) -> None:
    _needs(block)
    checker = LibraryUse(block)
    try:
        checker.visit(_tree(block))
    except ModuleNotFoundError as exc:  # a lazily imported optional package behind a library name
        pytest.skip(f"{block.key} needs {exc.name}, which is not installed")
    assert not checker.problems, "\n".join(checker.problems)


def _problems(code: str) -> list[str]:
    checker = LibraryUse(Block("t.md", 1, 0, code, frozenset(), None))
    checker.visit(ast.parse(code))
    return list(checker.problems)


def test_the_library_check_finds_what_it_is_for() -> None:
    assert _problems(
        "import rankwise\nfrom rankwise.methods.raclora import end_link\n"
        "cfg = rankwise.RacLoraConfig.cola(r=4)\ncfg = cfg.replace(seed=0)\nrankwise.attach(m, cfg, name='b')\n"
        "end_link(m, o)\nimport rankwise.integrations.hf\n"
        "rankwise.integrations.hf.RankwiseCallback(epochs_per_link=1)\n"
    ) == []
    found = _problems(
        "import rankwise as rw\nfrom rankwise import LoraConfg\nfrom rankwise.nowhere import x\n"
        "cfg = rw.LoraConfig(rank=8)\nrw.save(m, 'out', overwrite=True, extra=1)\nrw.attach(m)\n"
        "rw.step(m, o, True)\nrw.integrations._hf_callback.RankwiseCallback()\nrw.no_such(m)\ncfg.no_field\n"
        "cfg.replace(r=4).no_field\nrw.LoraConfig(*a, ranks=8)\n")
    expected = ["t.md:2: `from rankwise import LoraConfg`", "t.md:3: `from rankwise.nowhere import ...`",
                "t.md:4: LoraConfig", "'rank'", "t.md:5: save", "'extra'", "t.md:6: attach", "'config'",
                "t.md:7: step", "too many positional", "t.md:8: `rankwise.integrations._hf_callback` is not loaded",
                "t.md:9: rankwise has no attribute 'no_such'", "t.md:10: an instance of LoraConfig has no attribute",
                "t.md:11: an instance of AdapterConfig has no attribute 'no_field'",
                "t.md:12: LoraConfig() takes no keyword 'ranks'"]
    text = "\n".join(found)
    assert all(e in text for e in expected), text
    assert len(found) == 11, text
    # rankwise.integrations and .hf come on first use (PEP 562), so the dotted path is fine after `import rankwise`
    assert _problems("import rankwise\nrankwise.integrations.hf.RankwiseCallback()\n") == []


# ---------------------------------------------------------------------------------------------- 3. free names
def free_names(tree: ast.Module) -> set[str]:
    """Names read and never bound in the code (scopes flattened: a block is a short script)."""
    bound, read = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update(a.asname or a.name.split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return read - bound - set(dir(builtins))


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.key)
def test_block_names_only_what_it_defines_or_the_reader_has(block: Block) -> None:
    if "fragment" in block.marks:
        pytest.skip("marked <!-- fragment -->")
    free = free_names(ast.parse("".join(b.code for b in _with_predecessors(block))))
    given = GIVEN.get(block.key, {})
    assert free <= set(given), (f"{block.at(1)}: names {sorted(free - set(given))} without defining or importing them"
                                " (define them in the block, or list them as the reader's own in GIVEN)")
    assert set(given) <= free, f"GIVEN lists {sorted(set(given) - free)} for {block.key}, which no longer names them"


# ---------------------------------------------------------------------------------------------- 4. runs
VOCAB = 100


class TinyHub:
    """transformers' ``from_pretrained`` of the Auto classes, answered with tiny random models and tokenizer."""

    def __init__(self, folder: Path) -> None:
        sys.path.insert(0, str(ROOT / "tests"))  # conftest's tokenizer builder
        from conftest import save_tiny_tokenizer

        self.tokenizer_folder = folder / "tokenizer"
        save_tiny_tokenizer(self.tokenizer_folder, VOCAB)
        self.requested: list[str] = []

    def patch(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import transformers

        real = transformers.AutoTokenizer.from_pretrained
        folder = str(self.tokenizer_folder)

        def tokenizer(name: str, *args: Any, **kwargs: Any) -> Any:
            self.requested.append(str(name))
            tok = real(folder)
            tok.eos_token = tok.eos_token or tok.sep_token  # a WordPiece tokenizer has none; TRL appends one
            return tok

        def model(make: Callable[..., torch.nn.Module]) -> Callable[..., torch.nn.Module]:
            def from_pretrained(name: str, *args: Any, **kwargs: Any) -> torch.nn.Module:
                self.requested.append(str(name))
                torch.manual_seed(0)
                built = make(**{k: v for k, v in kwargs.items() if k == "num_labels"})
                built.config._name_or_path = str(name)  # as from_pretrained records it
                for param_name, param in built.named_parameters():  # as loaded from a checkpoint without the head
                    param._is_hf_initialized = not param_name.startswith(("classifier.", "score."))
                return built.eval()

            return staticmethod(from_pretrained)  # type: ignore[return-value]

        monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", staticmethod(tokenizer))
        monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", model(self.bert))
        monkeypatch.setattr(transformers.AutoModel, "from_pretrained",
                            model(lambda: transformers.BertModel(self._bert_config())))
        monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model(self.llama))

    @staticmethod
    def _bert_config(**kwargs: Any) -> Any:
        from transformers import BertConfig

        return BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=48, max_position_embeddings=64, **kwargs)

    def bert(self, num_labels: int = 2) -> torch.nn.Module:
        from transformers import BertForSequenceClassification

        return BertForSequenceClassification(self._bert_config(num_labels=num_labels))

    @staticmethod
    def llama() -> torch.nn.Module:
        from transformers import LlamaConfig, LlamaForCausalLM

        # the tiny tokenizer's [PAD] 0, [CLS] 2, [SEP] 3
        return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                            pad_token_id=0, bos_token_id=2, eos_token_id=3))


def _bert_batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        ids = torch.randint(5, VOCAB, (4, 12), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                        "labels": torch.randint(0, 2, (4,), generator=g)})
    return batches


def _preference_pairs() -> Any:
    from datasets import Dataset

    return Dataset.from_dict({"prompt": ["the quick brown fox", "the cat sat"] * 4,
                              "chosen": [" jumps over the lazy dog", " on the mat"] * 4,
                              "rejected": [" sat on the mat", " jumps over the dog"] * 4})


def _trl_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """TRL's configs default to ``bf16=True``, which transformers refuses without a GPU unless ``use_cpu=True``: the
    blocks are written for a GPU, so here that default becomes ``use_cpu=True`` (nothing else changes)."""
    import trl

    def on_cpu(config: type) -> Callable[..., Any]:
        return lambda *args, **kwargs: config(*args, **{"use_cpu": True, **kwargs})

    for name in ("DPOConfig", "SFTConfig"):
        monkeypatch.setattr(trl, name, on_cpu(getattr(trl, name)))


STAND_INS: dict[str, Callable[[], Any]] = {"loader": _bert_batches, "pairs": _preference_pairs}
RUNNABLE = [b for b in BLOCKS if b.key not in STATIC_ONLY and not b.include]


@pytest.mark.parametrize("block", [pytest.param(b, marks=[pytest.mark.slow] if b.key in SLOW else [], id=b.key)
                                   for b in RUNNABLE])
def test_block_runs(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                    capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    chain = _with_predecessors(block)
    for b in chain:
        _needs(b)
    hub = TinyHub(tmp_path)
    hub.patch(monkeypatch)
    if "trl" in block.code and not torch.cuda.is_available():
        _trl_on_cpu(monkeypatch)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    namespace: dict[str, Any] = {"__name__": "__main__"}
    namespace.update({name: STAND_INS[name]() for name in GIVEN.get(block.key, {})})
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for b in chain:
            file, offset = b.origin
            exec(compile("\n" * offset + b.code, file, "exec"), namespace)  # noqa: S102  (the docs' own code)
        import rankwise

        cfg = namespace.get("cfg")
        if isinstance(cfg, rankwise.AdapterConfig) and "model" not in namespace:
            # a block that only builds a config: its target names are BERT's, and they must find layers there
            report = rankwise.attach(hub.bert(), cfg)
            assert report.layers, f"{block.at(1)}: the config attaches to no layer of a BERT"
    capsys.readouterr()
    ours = [f"{w.filename}:{w.lineno}: {w.message}" for w in seen if "rankwise" in str(w.message)]
    assert not ours, "the block runs, but rankwise warns about it:\n" + "\n".join(ours)
    assert hub.requested or not re.search(r"from_pretrained\(", block.code), "a from_pretrained was not redirected"
