"""Image-text retrieval (COCO Karpathy 5k test, Flickr30k 1k test), the BLIP-2 protocol made fast.

    1. ITC: every image's 32 query features and every text's feature; similarity = max over queries.
    2. The top `k_test` texts of every image and images of every text are re-ranked by ITM; the score of a
       candidate is ITM positive logit + ITC similarity (the reference), ITM logit + ITC logit (similarity divided
       by the learned temperature), or either alone; all others get -100.

What makes it fast, with the same numbers as the reference's per-query loop:
    - ranks split the images (and texts, strided as every evaluator splits) instead of each encoding everything;
    - each (image, text) pair is scored once, even when it is in both top-k lists;
    - pairs are grouped by image, whose cross-attention keys/values are formed once for all its candidates;
    - ITM runs in batches of many pairs (the reference: one query at a time, in fp32);
    - image token maps stay on their rank, in half precision on a GPU (the reference holds ~19 GB per rank).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from qformer.blip2 import Blip2Stage1
from qformer.dist import all_gather_variable, get_rank, get_world_size
from tasks.data.captions import set_max_image_pixels
from tasks.data.text import clean_caption
from tasks.dist import gather_strided, shard_indices
from tasks.evals.common import METRICS_NAME, REPORT_NAME, autocast, image_batches, read_json, storage_dtype, write_json
from tasks.evals.config import EvalConfig
from tasks.evals.retrieval_metrics import retrieval_metrics

logger = logging.getLogger(__name__)

TOPK_NAME = "topk.json"


@dataclass
class RetrievalData:
    images: list[str]  # paths
    texts: list[str]  # cleaned captions
    img2txt: list[list[int]]
    txt2img: list[int]


def load_retrieval_data(ann_path: str, image_root: str, limit: int = 0) -> RetrievalData:
    """LAVIS-style test JSON: a list of {"image": relative path, "caption": [captions] or caption}; anything else
    is an error naming the file and the entry."""
    entries = read_json(ann_path, "retrieval annotation file")
    if not isinstance(entries, list):
        keys = f" with keys {sorted(entries)[:5]}" if isinstance(entries, dict) else ""
        raise ValueError(
            f"{ann_path}: expected a JSON list of {{'image', 'caption'}} entries (COCO Karpathy / Flickr30k test), "
            f"got a JSON {type(entries).__name__}{keys}"
            + (": a VQA questions file? (task=vqa)" if isinstance(entries, dict) and "questions" in entries else "")
        )
    if limit:
        entries = entries[:limit]
    data = RetrievalData([], [], [], [])
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "image" not in entry or "caption" not in entry:
            has = sorted(entry) if isinstance(entry, dict) else f"a {type(entry).__name__}"
            raise ValueError(f"{ann_path}[{i}]: an entry needs 'image' and 'caption' keys, has {has}")
        if not isinstance(entry["image"], str) or not entry["image"]:
            raise ValueError(f"{ann_path}[{i}]: 'image' must be a path (a non-empty string), got {entry['image']!r}")
        captions = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
        if not captions or not all(isinstance(c, str) for c in captions):
            raise ValueError(f"{ann_path}[{i}]: 'caption' must be a string or a non-empty list of strings")
        data.images.append(str(Path(image_root) / entry["image"]))
        data.img2txt.append([])
        for caption in captions:
            data.img2txt[-1].append(len(data.texts))
            data.txt2img.append(i)
            data.texts.append(clean_caption(caption))
    return data


@torch.no_grad()
def itc_similarity(image_feats: Tensor, text_feats: Tensor, chunk: int = 64) -> Tensor:
    """`[n_img, n_txt]` max over queries of `image_q . text`, in chunks of images (bounds `chunk * Q * n_txt`)."""
    rows = [
        torch.einsum("iqp,tp->itq", image_feats[s : s + chunk].float(), text_feats.float()).amax(-1)
        for s in range(0, image_feats.shape[0], chunk)
    ]
    return torch.cat(rows)


@torch.no_grad()
def itm_pair_scores(
    model: Blip2Stage1,
    image_embeds: Tensor,  # [n_local, N, E] this rank's images
    image_index: Tensor,  # [P] row of image_embeds of each pair, sorted
    input_ids: Tensor,  # [P, T]
    attention_mask: Tensor,  # [P, T]
    batch: int,
    autocast,
    progress: bool = False,
) -> Tensor:
    """ITM positive logit (mean over queries) of each pair, each image's keys/values formed once per batch."""
    q = model.cfg.qformer.num_query_tokens
    out = torch.empty(image_index.shape[0], device=input_ids.device)
    for start in tqdm(range(0, image_index.shape[0], batch), desc="ITM re-rank", disable=not progress):
        idx = image_index[start : start + batch]
        unique, inverse = torch.unique(idx, return_inverse=True)  # sorted pairs: few distinct images per batch
        with autocast:
            kv = model.qformer.image_keys_values(image_embeds[unique].float())
            kv = [None if t is None else (t[0].index_select(0, inverse), t[1].index_select(0, inverse)) for t in kv]
            hidden = model.qformer(
                input_ids[start : start + batch], attention_mask[start : start + batch], image_kv=kv
            ).hidden
            logits = model.itm_head(hidden[:, :q]).float().mean(dim=1)  # [b, 2]
        out[start : start + batch] = logits[:, 1]
    return out


def rerank_pairs(i2t_topk: Tensor, t2i_topk: Tensor, n_txt: int, rank: int, world: int) -> tuple[Tensor, Tensor]:
    """The distinct (image, text) pairs in either top-k list whose image is this rank's (`shard_indices`),
    sorted by image."""
    n_img, k = i2t_topk.shape
    images = torch.arange(n_img, device=i2t_topk.device)[:, None].expand(-1, k)
    texts = torch.arange(t2i_topk.shape[0], device=t2i_topk.device)[:, None].expand(-1, t2i_topk.shape[1])
    keys = torch.cat([(images * n_txt + i2t_topk).flatten(), (t2i_topk * n_txt + texts).flatten()])
    keys = torch.unique(keys)  # sorted: grouped by image
    img, txt = keys // n_txt, keys % n_txt
    own = img % world == rank
    return img[own], txt[own]


@torch.no_grad()
def evaluate_retrieval(model: Blip2Stage1, tokenizer, cfg: EvalConfig, device: torch.device) -> dict:
    rank, world = get_rank(), get_world_size()
    main = rank == 0
    set_max_image_pixels(cfg.max_image_pixels)
    data = load_retrieval_data(cfg.ann_path, cfg.image_root, cfg.limit)
    n_img, n_txt = len(data.images), len(data.texts)
    k = min(cfg.k_test, n_img, n_txt)
    mixed = autocast(device, cfg.precision)
    store = storage_dtype(device, cfg.precision)  # image token maps kept in half precision on a GPU
    model.eval()

    # 1. This rank's images (rows rank, rank + W, ...): token maps (kept here) and query features (shared).
    mine = [data.images[i] for i in shard_indices(n_img, rank, world)]
    size = model.cfg.vision.image_size
    embeds, feats = [], []
    for _, images in image_batches(mine, size, cfg.batch_size, cfg.num_workers, device, desc="images"):
        with mixed:
            e = model.encode_image(images)
            feats.append(model.image_features(e, use_cache=False).feats.float())
        embeds.append(e.to(store))
    image_embeds = torch.cat(embeds) if embeds else torch.empty(0, device=device)
    image_feats = gather_strided(torch.cat(feats) if feats else torch.empty(0, 1, 1, device=device), n_img)

    # 2. Texts: every rank tokenizes all (cheap), encodes its share.
    enc = tokenizer(
        data.texts, padding="max_length", truncation=True, max_length=cfg.max_text_length, return_tensors="pt"
    )
    ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)
    my_texts = torch.as_tensor(shard_indices(n_txt, rank, world), dtype=torch.long, device=device)
    text_feats = []
    for batch in tqdm(my_texts.split(cfg.batch_size), desc="texts", disable=not main):
        with mixed:
            text_feats.append(model.text_features(ids[batch], mask[batch]).feat.float())
    text_feats = gather_strided(torch.cat(text_feats) if text_feats else torch.empty(0, 1, device=device), n_txt)

    # 3. ITC for every pair, then the top-k both ways.
    sim = itc_similarity(image_feats, text_feats)  # [n_img, n_txt]
    i2t_topk = sim.topk(k, dim=1).indices  # [n_img, k]
    t2i_topk = sim.t().topk(k, dim=1).indices  # [n_txt, k]

    # 4. ITM once per distinct pair whose image lives here, then every rank gets every score.
    score_i2t = torch.full((n_img, n_txt), -100.0, device=device)
    score_t2i = torch.full((n_txt, n_img), -100.0, device=device)
    if cfg.score == "itc":
        score_i2t.scatter_(1, i2t_topk, sim.gather(1, i2t_topk))
        score_t2i.scatter_(1, t2i_topk, sim.t().gather(1, t2i_topk))
    else:
        img, txt = rerank_pairs(i2t_topk, t2i_topk, n_txt, rank, world)
        local = torch.div(img, world, rounding_mode="floor")  # row of image_embeds: image rank + j * W is row j
        itm = itm_pair_scores(model, image_embeds, local, ids[txt], mask[txt], cfg.batch_size, mixed, main)
        pairs = all_gather_variable(torch.stack([img.float(), txt.float(), itm], dim=1))  # [P_all, 3]
        itm_all = torch.full((n_img, n_txt), float("nan"), device=device)
        itm_all[pairs[:, 0].long(), pairs[:, 1].long()] = pairs[:, 2]
        # The reference adds the cosine, whose spread within a top-k is a small fraction of the ITM logits': the
        # re-rank is then ITM's alone. On the logit scale (cosine / temperature, as in the ITC loss) both count.
        # Only the chosen term: each is an [images, texts] matrix (COCO 5k: 0.5 GB in fp32).
        if cfg.score == "itm+itc":
            extra = sim
        elif cfg.score == "itm+itc_logit":
            extra = sim / model.temp.detach().float()
        else:
            extra = torch.zeros_like(sim)
        score_i2t.scatter_(1, i2t_topk, (itm_all + extra).gather(1, i2t_topk))
        score_t2i.scatter_(1, t2i_topk, (itm_all + extra).t().gather(1, t2i_topk))
    metrics = retrieval_metrics(score_i2t.cpu(), data.txt2img, data.img2txt, scores_t2i=score_t2i.cpu())
    metrics.update({"n_images": n_img, "n_texts": n_txt, "k_test": k, "score": cfg.score})
    if main:
        _write_outputs(cfg, data, metrics, score_i2t, score_t2i)
    return metrics


def _write_outputs(cfg: EvalConfig, data: RetrievalData, metrics: dict, score_i2t: Tensor, score_t2i: Tensor) -> None:
    out = Path(cfg.output_dir)
    write_json(out / METRICS_NAME, metrics, indent=2)
    top = min(10, score_i2t.shape[1], score_t2i.shape[1])
    i2t = score_i2t.topk(top, dim=1)
    t2i = score_t2i.topk(top, dim=1)
    topk = {
        "image_to_text": [
            {"image": data.images[i], "texts": i2t.indices[i].tolist(), "scores": i2t.values[i].tolist()}
            for i in range(len(data.images))
        ],
        "text_to_image": [
            {"text": data.texts[t], "images": t2i.indices[t].tolist(), "scores": t2i.values[t].tolist()}
            for t in range(len(data.texts))
        ],
    }
    write_json(out / TOPK_NAME, topk, indent=None)
    try:
        from tasks.evals.report import retrieval_report

        retrieval_report(
            out / REPORT_NAME, data.images, data.texts, i2t.indices.tolist(), data.img2txt, cfg.report_samples
        )
    except ImportError as e:  # the report is a convenience; the metrics are written regardless
        logger.warning("no HTML report: %s", e)
    logger.info("retrieval: %s", json.dumps({k: round(v, 2) for k, v in metrics.items() if isinstance(v, float)}))
