"""Renders k8s/base and every overlay the way kustomize does for the subset they use
(resources, JSON 6902 patches with a kind/name target, namespace), validates each object with
kubernetes-validate --strict, checks the custom resources' required fields, and checks that
the PrometheusRule carries exactly deploy/prometheus/alerts.yml. Exits non-zero on any problem."""

import copy
import os
import shutil
import subprocess
import sys
import tempfile

import jsonpatch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALLOWED = {"apiVersion", "kind", "resources", "patches", "namespace"}
CUSTOM = {
    "ServiceMonitor": ["spec.selector", "spec.endpoints"],
    "PrometheusRule": ["spec.groups"],
}


def fail(msg):
    print(f"validate_k8s: {msg}", file=sys.stderr)
    sys.exit(1)


def render(directory):
    path = os.path.join(directory, "kustomization.yaml")
    with open(path) as f:
        kz = yaml.safe_load(f)
    unknown = set(kz) - ALLOWED
    if unknown:
        fail(f"{path}: fields this check cannot render: {sorted(unknown)}")
    objects = []
    for res in kz.get("resources", []):
        full = os.path.normpath(os.path.join(directory, res))
        if os.path.isdir(full):
            objects += render(full)
        else:
            with open(full) as f:
                objects += [d for d in yaml.safe_load_all(f) if d]
    for p in kz.get("patches", []):
        target = p["target"]
        hits = [o for o in objects
                if o["kind"] == target["kind"] and o["metadata"]["name"] == target["name"]]
        if len(hits) != 1:
            fail(f"{path}: patch target {target} matches {len(hits)} objects")
        patched = jsonpatch.apply_patch(hits[0], yaml.safe_load(p["patch"]))
        objects[objects.index(hits[0])] = patched
    if "namespace" in kz:
        for o in objects:
            o["metadata"]["namespace"] = kz["namespace"]
    return objects


def has(obj, dotted):
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return False
        obj = obj[part]
    return True


def main():
    validator = sys.argv[1]
    with open(os.path.join(ROOT, "deploy/prometheus/alerts.yml")) as f:
        alerts = yaml.safe_load(f)
    tmp = tempfile.mkdtemp()
    try:
        for name in ["base", "overlays/dev", "overlays/prod"]:
            objects = render(os.path.join(ROOT, "k8s", name))
            kinds = sorted(o["kind"] for o in objects)
            files = []
            for i, o in enumerate(objects):
                if o["kind"] in CUSTOM:
                    missing = [f for f in CUSTOM[o["kind"]] if not has(o, f)]
                    if missing:
                        fail(f"{name}: {o['kind']} lacks {missing}")
                    if o["kind"] == "PrometheusRule" and o["spec"]["groups"] != alerts["groups"]:
                        fail(f"{name}: PrometheusRule differs from deploy/prometheus/alerts.yml")
                    continue
                f = os.path.join(tmp, f"{name.replace('/', '-')}-{i}.yaml")
                with open(f, "w") as out:
                    yaml.safe_dump(o, out)
                files.append(f)
            run = subprocess.run([validator, "--strict", "--quiet", *files],
                                 capture_output=True, text=True)
            if run.returncode != 0:
                fail(f"{name}: kubernetes-validate --strict:\n{run.stdout}{run.stderr}")
            # Where kubectl is installed, its kustomize must render the same objects.
            if shutil.which("kubectl"):
                out = subprocess.run(["kubectl", "kustomize", os.path.join(ROOT, "k8s", name)],
                                     capture_output=True, text=True)
                if out.returncode != 0:
                    fail(f"{name}: kubectl kustomize: {out.stderr}")
                theirs = sorted((d["kind"], d["metadata"]["name"], yaml.safe_dump(d, sort_keys=True))
                                for d in yaml.safe_load_all(out.stdout) if d)
                ours = sorted((d["kind"], d["metadata"]["name"], yaml.safe_dump(d, sort_keys=True))
                              for d in objects)
                if theirs != ours:
                    fail(f"{name}: our rendering differs from kubectl kustomize")
            print(f"validate_k8s: {name}: {len(objects)} objects valid ({', '.join(kinds)})")
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
