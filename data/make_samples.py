"""Write the tiny sample files of data/ (run from the repository root: python data/make_samples.py).

Each sample mimics one published layout (column names and file layout of the real set, see the
dataset card next to it) with a handful of rows and tiny synthetic media: 32x32 JPEGs and short
mp4 clips of several sizes, frame rates and lengths (real sets mix them). The files are
committed; this script only documents (and can redo) how they were made. Not a package.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from align.data.video import write_video  # noqa: E402


def frames(seed: int, t: int = 8, h: int = 32, w: int = 32) -> np.ndarray:
    """A smooth, codec-friendly moving pattern, distinct per seed."""
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 200, 3)
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.zeros((t, h, w, 3), np.uint8)
    for k in range(t):
        img = np.stack([base[c] + 40 * np.sin((xx + yy * (c + 1)) / 7 + k / 3 + seed) for c in range(3)], -1)
        x0 = (seed * 5 + 2 * k) % max(1, w - 8)
        img[h // 4 : h // 4 + 8, x0 : x0 + 8] = 245
        out[k] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def jpeg(seed: int, size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frames(seed, 1, size, size)[0]).save(buf, "JPEG", quality=70)
    return buf.getvalue()


def mp4(path: Path, seed: int, t: int = 8, h: int = 32, w: int = 32, fps: int = 8) -> None:
    write_video(path, frames(seed, t, h, w), fps=fps)


def fresh(name: str) -> Path:
    d = HERE / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir()
    return d


def pickapic() -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = fresh("pickapic_v2")
    rows = [  # (caption, label_0, label_1, has_label, are_different)
        ("a red fox in the snow", 1.0, 0.0, True, True),
        ("a lighthouse at dusk", 0.0, 1.0, True, True),
        ("two cups of coffee", 0.5, 0.5, True, True),
        ("a castle made of glass", None, None, False, True),
        ("a tiny robot", 1.0, 0.0, True, False),
    ]
    table = {
        "are_different": [r[4] for r in rows],
        "best_image_uid": [f"uid-{i}-{0 if (r[1] or 0) >= (r[2] or 0) else 1}" for i, r in enumerate(rows)],
        "caption": [r[0] for r in rows],
        "has_label": [r[3] for r in rows],
        "image_0_uid": [f"uid-{i}-0" for i in range(len(rows))],
        "image_1_uid": [f"uid-{i}-1" for i in range(len(rows))],
        "jpg_0": [jpeg(2 * i) for i in range(len(rows))],
        "jpg_1": [jpeg(2 * i + 1) for i in range(len(rows))],
        "label_0": [r[1] for r in rows],
        "label_1": [r[2] for r in rows],
        "model_0": ["stabilityai/stable-diffusion-xl-base-1.0", "runwayml/stable-diffusion-v1-5"] * 2 + ["sdxl"],
        "model_1": ["runwayml/stable-diffusion-v1-5", "stabilityai/stable-diffusion-xl-base-1.0"] * 2 + ["sdxl"],
        "ranking_id": list(range(100, 100 + len(rows))),
        "user_id": [7, 8, 7, 9, 9],
    }
    pq.write_table(pa.table(table), d / "sample.parquet")


def hpdv2() -> None:
    d = fresh("hpdv2")
    (d / "train").mkdir()
    recs = []
    for i, prompt in enumerate(["an astronaut riding a horse", "a bowl of ramen, studio light"]):
        names = [f"train/{i:05d}_{k}.jpg" for k in range(2)]
        for k, n in enumerate(names):
            (d / n).write_bytes(jpeg(20 + 2 * i + k))
        recs.append({"prompt": prompt, "image_path": names, "human_preference": [1, 0] if i == 0 else [0, 1]})
    (d / "train.json").write_text(json.dumps(recs, indent=1))


def imagereward() -> None:
    d = fresh("imagereward")
    (d / "images").mkdir()
    lines = []
    for p, (pid, prompt) in enumerate([("000864-0061", "a watercolor city"), ("000865-0062", "a dragon made of smoke")]):
        for k, rank in enumerate([2, 1, 3]):
            name = f"images/{pid}_{k}.jpg"
            (d / name).write_bytes(jpeg(40 + 3 * p + k))
            rec = {
                "image_path": name,
                "prompt_id": pid,
                "prompt": prompt,
                "classification": "Arts",
                "image_amount_in_total": 3,
                "rank": rank,
                "overall_rating": 8 - 2 * rank,
                "image_text_alignment_rating": 7 - rank,
                "fidelity_rating": 6 - rank,
            }
            lines.append(json.dumps(rec))
    (d / "sample.jsonl").write_text("\n".join(lines) + "\n")


def videogen_rewardbench() -> None:
    d = fresh("videogen_rewardbench")
    (d / "README.md").write_text(
        "---\nlicense: apache-2.0\nconfigs:\n- config_name: default\n  data_files:\n  - split: eval\n"
        '    path: "videogen-rewardbench.csv"\n---\n\nA 3-row look-alike of the KlingTeam/VideoGen-RewardBench '
        "repository (see ../videogen_rewardbench.md).\n"
    )
    # two "models" with different sizes, frame rates and lengths, as in the real benchmark
    specs = {"kling1.5": dict(t=16, h=32, w=48, fps=8), "minimax": dict(t=24, h=48, w=32, fps=16)}
    staging = d / "_videos"
    names = []
    for m, spec in specs.items():
        for k in range(3):
            name = f"videos/{m}/{m}_{k:05d}.mp4"
            mp4(staging / name, 60 + 10 * len(names) + k, **spec)
            names.append(name)
    with zipfile.ZipFile(d / "videos.zip", "w", zipfile.ZIP_STORED) as z:
        for n in names:
            z.write(staging / n, n)
    shutil.rmtree(staging)
    rows = [
        ("Static camera, a metal ball rolls on a smooth tabletop.", 0, "A", "A", "same", "A"),
        ("A paper boat drifts down a rain gutter.", 1, "B", "B", "B", "B"),
        ("A candle flickers in a dark room.", 2, "same", "A", "B", "same"),
    ]
    lines = ["path_A,path_B,A_model,B_model,prompt,VQ,MQ,TA,Overall,fps_A,fps_B,num_frames_A,num_frames_B"]
    for prompt, k, vq, mq, ta, ov in rows:
        a, b = f"videos/kling1.5/kling1.5_{k:05d}.mp4", f"videos/minimax/minimax_{k:05d}.mp4"
        lines.append(f'{a},{b},kling1.5,minimax,"{prompt}",{vq},{mq},{ta},{ov},8,16,16,24')
    (d / "videogen-rewardbench.csv").write_text("\n".join(lines) + "\n")


def videoalign() -> None:
    d = fresh("videoalign")
    for k in range(6):
        mp4(d / "videos" / f"example_{k // 2 + 1}_{'AB'[k % 2]}.mp4", 90 + k, t=12 if k % 2 else 16, fps=8)
    rows = [
        ("A cat chases a laser dot.", "A", "A", "B"),
        ("Waves crash on black rocks.", "B", "same", "B"),
        ("A hot air balloon rises.", "A", "B", "same"),
    ]
    lines = ["path_A,path_B,prompt,VQ,MQ,TA,fps_A,num_frames_A,fps_B,num_frames_B"]
    for i, (prompt, vq, mq, ta) in enumerate(rows, start=1):
        lines.append(f'./videos/example_{i}_A.mp4,./videos/example_{i}_B.mp4,"{prompt}",{vq},{mq},{ta},8,16,8,12')
    (d / "train.csv").write_text("\n".join(lines) + "\n")


def genai_bench_video() -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = fresh("genai_bench_video")
    for k in range(8):
        mp4(d / "videos" / f"v{k}.mp4", 120 + k, t=8, h=32, w=32 if k % 2 else 40, fps=8)
    votes = ["leftvote", "rightvote", "tievote", "bothbad_vote"]
    table = {
        "prompt": ["a corgi surfing", "fireworks over a lake", "a clock melting", "a train in the desert"],
        "left_model": ["LaVie", "VideoCrafter2", "AnimateDiff", "OpenSora"],
        "left_video": [f"videos/v{2 * i}.mp4" for i in range(4)],
        "right_model": ["OpenSora", "LaVie", "VideoCrafter2", "AnimateDiff"],
        "right_video": [f"videos/v{2 * i + 1}.mp4" for i in range(4)],
        "vote_type": votes,
    }
    pq.write_table(pa.table(table), d / "sample.parquet")


def rapidata() -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = fresh("rapidata")
    for k in range(6):
        mp4(d / "videos" / f"clip_{k}.mp4", 150 + k, t=10, h=32, w=32, fps=10)
    w1 = [0.8, 0.3, 0.5]
    table = {
        "prompt": ["a jellyfish glowing", "a skateboarder kickflip", "rain on a window"],
        "video1": [f"https://assets.example.invalid/videos/clip_{2 * i}.mp4" for i in range(3)],
        "video2": [f"https://assets.example.invalid/videos/clip_{2 * i + 1}.mp4" for i in range(3)],
        "file_name1": [f"clip_{2 * i}.mp4" for i in range(3)],
        "file_name2": [f"clip_{2 * i + 1}.mp4" for i in range(3)],
        "model1": ["veo2", "veo2", "wan2.1"],
        "model2": ["sora", "wan2.1", "sora"],
        "weighted_results1_Preference": w1,
        "weighted_results2_Preference": [1 - x for x in w1],
        "weighted_results1_Coherence": [0.6, 0.6, 0.2],
        "weighted_results2_Coherence": [0.4, 0.4, 0.8],
        "weighted_results1_Alignment": [0.5, 0.1, 0.7],
        "weighted_results2_Alignment": [0.5, 0.9, 0.3],
    }
    pq.write_table(pa.table(table), d / "sample.parquet")


def videofeedback() -> None:
    d = fresh("videofeedback")
    lines = []
    scores = [[3, 3, 2, 3, 3], [2, 1, 2, 2, 1], [3, 3, 2, 3, 3], [4, 3, 3, 4, 4], [1, 2, 2, 1, 1], [3, 2, 3, 3, 2]]
    prompts = ["a butterfly lands on a flower", "a chef flips a pancake"]
    for v in range(6):
        vid = f"p1103{v // 3}_{v % 3}"
        names = []
        for k, frame in enumerate(frames(200 + v, t=4, h=16, w=16)):
            name = f"frames/{vid}/{vid}_{k:02d}.jpg"
            (d / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(frame).save(d / name, "JPEG", quality=75)
            names.append(name)
        rec = {"id": vid, "images": names, "text prompt": prompts[v // 3], "video link": f"https://example.invalid/{vid}.mp4"}
        rec.update(dict(zip(("visual quality", "temporal consistency", "dynamic degree", "text-to-video alignment",
                             "factual consistency"), scores[v])))
        lines.append(json.dumps(rec))
    (d / "sample.jsonl").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    for make in (pickapic, hpdv2, imagereward, videogen_rewardbench, videoalign, genai_bench_video, rapidata, videofeedback):
        make()
    total = sum(f.stat().st_size for f in HERE.rglob("*") if f.is_file())
    print(f"data/: {total / 1024:.0f} KiB")
