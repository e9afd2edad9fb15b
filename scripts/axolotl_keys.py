"""Write `ftlab/config/axolotl_keys.json`: every key axolotl's config schema defines, read from its sources.

    python scripts/axolotl_keys.py PATH_TO_AXOLOTL [--out ftlab/config/axolotl_keys.json]

PATH_TO_AXOLOTL is a checkout or a bare git repository (read at HEAD). The pydantic models in
`src/axolotl/utils/schemas/*.py` and the plugins' `src/axolotl/integrations/*/args.py` are parsed with `ast`
(nothing of axolotl is imported): the fields of `AxolotlInputConfig` and its bases are the top-level keys, the
fields of the dataset models the keys of a `datasets:` entry, and `trl:` / `vllm:` / `ebft:` / `special_tokens:`
/ `fsdp_config:` the keys of those sections. Each key records the file and class that declares it (`peft.LoraConfig`), so a
reader of the table sees where it comes from; plugin keys record their plugin.
"""
from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from pathlib import Path

SCHEMAS = "src/axolotl/utils/schemas/"
INTEGRATIONS = "src/axolotl/integrations/"
DATASET_MODELS = ("SFTDataset", "DPODataset", "KTODataset", "StepwiseSupervisedDataset", "SyntheticDataset",
                  "PretrainingDataset")
NESTED = {"trl": "TRLConfig", "vllm": "VllmConfig", "ebft": "EBFTConfig", "special_tokens": "SpecialTokensConfig",
          "fsdp_config": "FSDPConfig"}


class Source:
    "Files of an axolotl checkout or bare repository."
    def __init__(self, path: str):
        self.path = Path(path)
        self.bare = not (self.path / "src").is_dir()
        if self.bare:
            self.commit = self._git("rev-parse", "HEAD").strip()
            self.names = self._git("ls-tree", "-r", "HEAD", "--name-only").split()
        else:
            self.names = [str(p.relative_to(self.path)) for p in self.path.rglob("*.py")]
            try: self.commit = self._git("rev-parse", "HEAD").strip()
            except Exception: self.commit = None

    def _git(self, *args) -> str:
        return subprocess.run(["git", "-C", str(self.path), *args], check=True, capture_output=True, text=True).stdout

    def read(self, name: str) -> str:
        return self._git("show", f"HEAD:{name}") if self.bare else (self.path / name).read_text()


def _string_kw(call, name):
    for kw in call.keywords:
        if kw.arg == name and isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, str): return kw.value.value
    return None

def _alias_choices(call) -> list[str]:
    for kw in call.keywords:
        if kw.arg == "validation_alias" and isinstance(kw.value, ast.Call):
            return [a.value for a in kw.value.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    return []

def class_fields(node: ast.ClassDef) -> list[str]:
    "Field names a pydantic model class declares in its body, with their aliases (both are accepted by axolotl)."
    out = []
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)): continue
        name = stmt.target.id
        if name.startswith("_") or name == "model_config": continue
        ann = ast.unparse(stmt.annotation)
        if ann.startswith("ClassVar"): continue
        out.append(name)
        if isinstance(stmt.value, ast.Call):
            alias = _string_kw(stmt.value, "alias")
            if alias: out.append(alias)
            out += _alias_choices(stmt.value)
    return out

def parse_classes(src: Source, names) -> dict[str, tuple[str, ast.ClassDef]]:
    "class name -> (module label, node) for every class in the files."
    classes = {}
    for name in names:
        tree = ast.parse(src.read(name))
        label = Path(name).stem if name.startswith(SCHEMAS) else Path(name).parent.name
        for node in tree.body:
            if isinstance(node, ast.ClassDef): classes.setdefault(node.name, (label, node))
    return classes

def collect(classes, root: str) -> dict[str, str]:
    "key -> `module.Class` declaring it, for `root` and all its bases found in `classes` (first declaration wins)."
    out, seen = {}, set()
    def walk(name):
        if name in seen or name not in classes: return
        seen.add(name)
        label, node = classes[name]
        for k in class_fields(node): out.setdefault(k, f"{label}.{name}")
        for b in node.bases: walk(ast.unparse(b).split(".")[-1])
    walk(root)
    return out

def plugins(src: Source) -> dict[str, dict]:
    "Each plugin class, by the dotted names configs use for it, with its args class."
    found = {}
    for name in src.names:
        if not (name.startswith(INTEGRATIONS) and name.endswith(".py")): continue
        tree = ast.parse(src.read(name))
        for node in tree.body:
            if not (isinstance(node, ast.ClassDef) and any(ast.unparse(b).endswith("BasePlugin") for b in node.bases)):
                continue
            args = None
            for f in node.body:
                if isinstance(f, ast.FunctionDef) and f.name == "get_input_args":
                    for r in ast.walk(f):
                        if isinstance(r, ast.Return) and isinstance(r.value, ast.Constant): args = r.value.value
            pkg = name[len("src/"):-len(".py")].replace("/", ".")
            short = pkg.rsplit(".", 1)[0] if pkg.endswith((".plugin", ".plugins", ".__init__")) else pkg
            found[f"{short}.{node.name}"] = {"module": f"{pkg.removesuffix('.__init__')}.{node.name}",
                                             "dir": name.split("/")[3], "args": args.rsplit(".", 1)[-1] if args else None}
    return dict(sorted(found.items()))

def build(path: str) -> dict:
    src = Source(path)
    schema_files = sorted(n for n in src.names if n.startswith(SCHEMAS) and n.endswith(".py") and "/internal/" not in n)
    arg_files = sorted(n for n in src.names if n.startswith(INTEGRATIONS) and n.endswith("/args.py"))
    classes = parse_classes(src, schema_files)
    plugin_classes = parse_classes(src, arg_files)
    top = collect(classes, "AxolotlInputConfig")
    dataset = {}
    for m in DATASET_MODELS:
        for k, sec in collect(classes, m).items(): dataset.setdefault(k, sec)
    for m in ("UserDefinedPrompterType", "UserDefinedDPOType", "UserDefinedKTOType"):
        pass  # the fields of a `type:` mapping, not keys of the entry
    sections = {key: dict(sorted(collect(classes, cls).items())) for key, cls in NESTED.items()}
    plugin_table = plugins(src)
    plugin_keys = {}
    for p in plugin_table.values():
        if p["args"] and p["args"] in plugin_classes:
            for k, sec in collect(plugin_classes, p["args"]).items():
                if k not in top: plugin_keys.setdefault(k, f"plugin {p['dir']}")
    return {"axolotl_commit": src.commit,
            "top": dict(sorted(top.items())), "plugin_keys": dict(sorted(plugin_keys.items())),
            "dataset": dict(sorted(dataset.items())), "sections": sections, "plugins": plugin_table}

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("axolotl", help="an axolotl checkout or bare git repository")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "ftlab/config/axolotl_keys.json"))
    a = ap.parse_args(argv)
    table = build(a.axolotl)
    Path(a.out).write_text(json.dumps(table, indent=1) + "\n")
    n = len(table["top"]) + len(table["plugin_keys"])
    print(f"{a.out}: {n} top-level keys ({len(table['plugin_keys'])} from plugins), {len(table['dataset'])} dataset keys, "
          + ", ".join(f"{len(v)} under {k}:" for k, v in table["sections"].items()) + f", {len(table['plugins'])} plugins",
          file=sys.stderr)

if __name__ == "__main__":
    main()
