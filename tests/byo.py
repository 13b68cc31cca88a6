"""Inputs as users hold them, made from one set of photo-like pictures: a folder of image files
(in subfolders, mixed sizes and formats), CSV and JSONL manifests of their paths, WebDataset tar
shards and an OpenAI Batch file, each with one bad entry of its own kind."""

from __future__ import annotations

import base64
import csv
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qvl_batch.tooling.pictures import encode_jpeg, encode_png, photo_like

SIZES = [(640, 480), (300, 500), (1024, 768), (200, 200), (800, 256)]


@dataclass
class Inputs:
    """Where each kind lies, and what a job over it must give: id -> image bytes for good rows,
    id -> error code for bad ones."""

    folder: Path
    csv: Path
    jsonl: Path
    tars: Path
    batch: Path
    images: dict[str, bytes] = field(default_factory=dict)  # relative path -> bytes


def _pictures(n: int, seed: int) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        img = photo_like(rng, w, h)
        ext, data = ("png", encode_png(img)) if i % 4 == 3 else ("jpg", encode_jpeg(img))
        out[f"{'ab'[i % 2]}/img{i:03d}.{ext}"] = data
    return out


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def batch_line(cid: str, data: bytes, prompt: str, **body) -> dict:
    url = "data:image/jpeg;base64," + base64.b64encode(data).decode()
    content = [{"type": "text", "text": prompt}, {"type": "image_url", "image_url": {"url": url}}]
    return {
        "custom_id": cid,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "qwen2.5-vl", "messages": [{"role": "user", "content": content}], **body},
    }


def make_inputs(root: Path, n: int = 24, seed: int = 0) -> Inputs:
    pics = _pictures(n, seed)
    folder = root / "photos"
    for rel, data in pics.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    (folder / "b" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (folder / "notes.txt").write_text("not an image: left out of the listing")

    man = root / "manifests"
    man.mkdir()
    with open(man / "images.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "image", "topic"])
        for i, rel in enumerate(pics):
            writer.writerow([f"c{i:03d}", f"../photos/{rel}", f"topic, {i}"])
        fh.write("c-short,only two fields\n")
    with open(man / "images.jsonl", "w") as fh:
        for i, rel in enumerate(pics):
            fh.write(json.dumps({"id": f"j{i:03d}", "image": str(folder / rel), "n": i}) + "\n")
            if i == 2:
                fh.write("\n")  # blank lines are not rows
        fh.write('{"id": "j-bad", "image": \n')

    tars = root / "shards"
    tars.mkdir()
    items = list(pics.items())
    half = len(items) // 2
    for k, part in enumerate((items[:half], items[half:])):
        members = []
        for rel, data in part:
            key = rel.replace("/", "_").rsplit(".", 1)[0]
            ext = rel.rsplit(".", 1)[1]
            members += [
                (f"{key}.{ext}", data),
                (f"{key}.txt", f"caption of {key}".encode()),
                (f"{key}.json", json.dumps({"url": f"http://x/{key}", "w": 1}).encode()),
            ]
        if k == 1:
            members.append(("noimage.txt", b"a sample without its image"))
        _tar(tars / f"{k:05d}.tar", members)

    with open(root / "requests.jsonl", "w") as fh:
        for i, (_, data) in enumerate(pics.items()):
            body = {"max_tokens": 24} if i % 3 else {"max_tokens": 24, "temperature": 0}
            fh.write(json.dumps(batch_line(f"req-{i:03d}", data, f"What is in photo {i}?", **body)))
            fh.write("\n")
        fh.write(json.dumps(batch_line("req-long", data, "Say more.", max_tokens=500)) + "\n")
        fh.write("{not json\n")
    return Inputs(
        folder, man / "images.csv", man / "images.jsonl", tars, root / "requests.jsonl", pics
    )
