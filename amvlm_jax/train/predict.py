"""Segment new images (mode 'predict'): a folder of scans in, one mask file per image out.

The input is a folder of images (any format the reader takes, nested
folders allowed; reports from config.predict.reports when given) or an LViT
split folder (img/ and its report sheet, or config.predict.reports). Images are read batch by batch,
resized to the training resolution, segmented on all devices, and the
predictions resized back to each image's own size:

  <output>/<relative path>/<stem>.png          0/255 mask (binary) or class ids (multi-class: a palette
                                                PNG, its pixel values the ids, shown in colour)
  <stem>_probability.png | .npy                 the foreground probability (predict.probabilities)
  <stem>_overlay.png                            the image with the mask in red, or each class in its
                                                palette colour (predict.overlays)
  <stem>_text.png                               the report's text mask, 0-255 (checkpoints with text guidance)
  <output>/predictions.csv                      image file, mask file, size, foreground fraction, pixels per class

A second run skips images whose mask exists unless predict.overwrite. An
unreadable image is reported by name and counted, and the run goes on
unless predict.stop_on_error.
"""

from __future__ import annotations

import concurrent.futures
import csv
import pathlib

import jax
import numpy as np
from PIL import Image
from tqdm import tqdm

from amvlm_jax import visualize
from amvlm_jax.config import ConfigError
from amvlm_jax.data import folders, pipeline
from amvlm_jax.train import checkpoint, evaluate, loop, supervised
from amvlm_jax.train.logging import info
from amvlm_jax.train.parallel import abstract_replicated, gather_to_host, make_mesh

MASK_SUFFIX = ".png"


def list_inputs(config) -> list[tuple[pathlib.Path, pathlib.Path, str | None]]:
    """(path relative to the input folder without suffix, image path, report or None) of every input image."""
    root = pathlib.Path(config.predict.input).expanduser()
    if not config.predict.input or not root.is_dir():
        raise ConfigError(f"config.predict.input: '{config.predict.input}' is not a folder of images")
    reports = {}
    sheet = pathlib.Path(config.predict.reports).expanduser()
    if config.predict.reports:
        if not sheet.is_file():
            raise ConfigError(f"config.predict.reports: {sheet} {'is not a file' if sheet.exists() else 'not found'}")
        reports = {stem: text for stem, (_, _, text) in folders.sheet_reports(sheet, folders.file_stem).items()}
    if folders.is_split_folder(root):  # An LViT split folder: its images, with its own reports or the sheet's.
        entries = folders.list_split_folder(root, False)
        if not config.predict.reports:
            return [(pathlib.Path(e.name), e.image_path, e.report) for e in entries]
        named = [(pathlib.Path(e.name), e.image_path) for e in entries]
    else:
        files = [p for p in sorted(root.rglob("*")) if not any(part.startswith(".") for part in p.relative_to(root).parts)]
        if splits := [p for p in files if p.is_dir() and folders.is_split_folder(p)]:  # Masks would be segmented too.
            shown = ", ".join(str(p.relative_to(root)) for p in splits[:3])
            raise ConfigError(f"config.predict.input: {root} holds LViT split folders ({shown}); give one of them, "
                              "or a folder of images")
        named = [(p.relative_to(root).with_suffix(""), p) for p in files
                 if p.is_file() and p.suffix.lower() in folders.IMAGE_SUFFIXES]
        first = {}
        for name, path in named:  # x.png and x.jpg would write one mask, x.png.
            if name in first:
                raise ConfigError(f"config.predict.input: {first[name]} and {path} would both be segmented into "
                                  f"{name}{MASK_SUFFIX}; rename one")
            first[name] = path
    if not named:
        raise ConfigError(f"config.predict.input: {root} holds no images ({', '.join(sorted(folders.IMAGE_SUFFIXES))})")
    if config.predict.reports and not any(p.stem in reports for _, p in named):
        raise ConfigError(f"config.predict.reports: {sheet} names none of the {len(named)} images in {root} "
                          "(rows are matched to images by file stem)")
    return [(name, p, reports.get(p.stem)) for name, p in named]


def check_output(config) -> pathlib.Path:
    output = pathlib.Path(config.predict.output).expanduser()
    if not config.predict.output:
        raise ConfigError("config.predict.output: set the folder the masks go to")
    existing = next(p for p in (output, *output.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"config.predict.output: {existing} is a file, not a folder")
    source = pathlib.Path(config.predict.input).expanduser().resolve()
    if output.resolve() == source or source in output.resolve().parents:
        raise ConfigError(f"config.predict.output: {output} is inside the input folder {source}; choose another folder")
    return output


def _resize(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A (S, S) float map resized bilinearly to (width, height) = size, as (height, width) float32."""
    image = Image.fromarray(np.asarray(array, np.float32), mode="F")
    return np.asarray(image if image.size == size else image.resize(size, Image.BILINEAR), np.float32)


def to_original_size(probabilities: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(labels (H, W) uint8, foreground probability (H, W)) at the image's own size.

    probabilities: (S, S) foreground probability (binary) or (S, S, C) class
    probabilities; each is resized bilinearly, then thresholded at 0.5 or
    arg-maxed.
    """
    if probabilities.ndim == 2:
        foreground = _resize(probabilities, size)
        return (foreground > 0.5).astype(np.uint8), foreground
    classes = np.stack([_resize(probabilities[..., c], size) for c in range(probabilities.shape[-1])], axis=-1)
    return np.argmax(classes, axis=-1).astype(np.uint8), 1.0 - classes[..., 0]


def mask_image(labels: np.ndarray, num_classes: int) -> Image.Image:
    """The mask file's image: 0/255 grey (binary), else a palette image whose pixel values are the class ids."""
    if num_classes == 1:
        return Image.fromarray(labels * 255)
    image = Image.fromarray(labels, mode="P")
    image.putpalette(visualize.class_colours(num_classes).ravel().tolist())
    return image


def overlay(image_path: pathlib.Path, labels: np.ndarray, num_classes: int = 1) -> Image.Image:
    """The image (RGB, its own size) with foreground pixels blended towards their class colour (red: binary)."""
    image = np.asarray(folders.rgb_image(image_path))  # (H, W, 3) uint8, kept where labels is 0.
    shown, foreground = image.copy(), labels > 0
    # Only the foreground in float32 (the temporaries of the whole image were 6 float arrays of its size).
    colours = visualize.class_colours(num_classes).astype(np.float32)[labels[foreground]]
    shown[foreground] = (0.55 * image[foreground].astype(np.float32) + 0.45 * colours).astype(np.uint8)
    return Image.fromarray(shown)


def predict(config, workdir) -> dict:
    """Segments every image of config.predict.input with the checkpoint evaluate would choose; writes the
    outputs listed in the module docstring and returns {'images', 'written', 'skipped', 'failed', 'csv'}."""
    workdir = pathlib.Path(workdir)
    items = list_inputs(config)
    output = check_output(config)
    mesh = make_mesh(config, batch_size=0)  # Its batches are padded to a multiple of the devices (below).
    source = config.eval.checkpoint or workdir
    model = supervised.build_unet(config)
    variables, meta, used = checkpoint.restore_variables(
        source, abstract_replicated(mesh, jax.eval_shape(lambda: supervised.init_variables(config, model))))
    info(f"predicting with {used} (epoch {meta.get('epoch')}) on {len(items)} images")
    predict_step = evaluate.make_predict_step(model, probabilities=True)
    text = text_masker(config, workdir, source, mesh) if any(report for _, _, report in items) else None

    size, num_classes = config.data.image_size, config.data.num_classes
    batch_size = -(-config.train.eval_batch_size // mesh.size) * mesh.size
    todo = [item for item in items
            if config.predict.overwrite or not (output / item[0]).with_suffix(MASK_SUFFIX).is_file()]
    chunks = [todo[start:start + batch_size] for start in range(0, len(todo), batch_size)]
    failures: list[str] = []
    counts: dict[pathlib.Path, list] = {}  # predictions.csv's row of each mask written now (write_table).

    def read(item):  # (image (S, S, 3) uint8, (width, height)), or the DataError naming an unreadable file.
        try:
            return folders.load_image(item[1], size)
        except folders.DataError as error:
            return error

    def write(kept, probabilities, p_text):
        """Writes the files of a batch's images: kept [(item, (image, original size))], probabilities
        (N, S, S[, C]), p_text (N, S, S) or None."""
        for row, ((relative, path, report), (_, original)) in enumerate(kept):
            target = output / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            labels, foreground = to_original_size(probabilities[row], original)
            mask_image(labels, num_classes).save(target.with_suffix(MASK_SUFFIX))
            if config.predict.probabilities == "png16":
                Image.fromarray(np.round(foreground * 65535).astype(np.uint16)).save(
                    target.parent / f"{target.name}_probability.png")
            elif config.predict.probabilities == "npy":
                np.save(target.parent / f"{target.name}_probability.npy", foreground.astype(np.float32))
            if config.predict.overlays:
                overlay(path, labels, num_classes).save(target.parent / f"{target.name}_overlay.png")
            if p_text is not None and report:
                text_map = _resize(p_text[row], original)
                Image.fromarray(np.round(np.clip(text_map, 0, 1) * 255).astype(np.uint8)).save(
                    target.parent / f"{target.name}_text.png")
            counts[relative] = mask_counts(labels, num_classes)

    writes = jax.process_index() == 0
    progress = tqdm(total=len(todo), desc="predicting", disable=not writes)
    # Batch k's files are written while the devices segment batch k + 1 and the pool decodes batch k + 2
    # (PIL decodes without the GIL; it encodes PNGs with it, hence on this thread): two batches are held.
    with concurrent.futures.ThreadPoolExecutor(max(1, config.data.read_threads)) as pool:
        reading = [pool.submit(read, item) for item in chunks[0]] if chunks else []
        pending = None  # (kept, probabilities, p_text) of the batch whose files are not written yet.
        for index, chunk in enumerate(chunks):
            loaded = [future.result() for future in reading]
            reading = [pool.submit(read, item) for item in chunks[index + 1]] if index + 1 < len(chunks) else []
            failed = [image for image in loaded if isinstance(image, folders.DataError)]
            if failed and config.predict.stop_on_error:
                if pending is not None and writes:
                    write(*pending)  # Every batch before the unreadable image keeps its files.
                raise failed[0]
            failures += [str(error) for error in failed]
            kept = [(item, image) for item, image in zip(chunk, loaded) if not isinstance(image, folders.DataError)]
            progress.update(len(chunk))
            segmented = p_text = None
            if kept:  # Dispatched, not awaited: the devices work while the previous batch is written.
                images = np.stack([image for _, (image, _) in kept])
                rows = np.resize(np.arange(len(kept)), batch_size)  # Padded by repetition to a full batch.
                batch = pipeline.replicated_to_global(mesh, {"image": images[rows]})
                segmented = predict_step(variables["params"], variables["batch_stats"], batch["image"])
                p_text = text(images, [item[2] for item, _ in kept], batch_size) if text is not None else None
            if pending is not None and writes:
                write(*pending)
            pending = None
            loop.stop_if_interrupted((segmented, p_text))  # The batches before this one have their files.
            if kept:
                probabilities, p_text = gather_to_host((segmented, p_text))
                pending = (kept, np.asarray(probabilities)[: len(kept)],
                           None if p_text is None else np.asarray(p_text)[: len(kept)])
        if pending is not None and writes:
            write(*pending)
    progress.close()
    summary = {"images": len(items), "written": len(todo) - len(failures), "skipped": len(items) - len(todo),
               "failed": len(failures), "csv": str(output / "predictions.csv")}
    if writes:
        output.mkdir(parents=True, exist_ok=True)
        write_table(output, items, num_classes, counts)
    unreported = sum(report is None for _, _, report in items) if config.predict.reports else 0
    info(f"{summary['written']} masks written to {output}, {summary['skipped']} skipped (outputs exist; "
         f"predict.overwrite=True redoes them), {summary['failed']} failed"
         + (f", {unreported} without a report in {config.predict.reports}" if unreported else ""))
    for failure in failures:
        info(f"  failed: {failure}")
    return summary


def mask_counts(labels: np.ndarray, num_classes: int) -> list:
    """predictions.csv's numbers of a mask (H, W) of class ids: width, height, foreground fraction, pixels per
    class (at least two classes)."""
    labels = (labels > 0).astype(np.int64) if num_classes == 1 else labels.astype(np.int64)
    counts = np.bincount(labels.ravel(), minlength=max(2, num_classes))
    return [labels.shape[1], labels.shape[0], f"{float(np.mean(labels > 0)):.6f}"] + [int(c) for c in counts]


def write_table(output: pathlib.Path, items, num_classes: int, counts: dict | None = None) -> None:
    """predictions.csv: every input with a mask, its size, foreground fraction and pixels per class.

    counts: {relative path: ``mask_counts``} of the masks this run wrote; the others (skipped: written
    before) are read back from their files.
    """
    counts = counts or {}
    with open(output / "predictions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "mask", "width", "height", "foreground_fraction"]
                        + [f"class_{c}_pixels" for c in range(max(2, num_classes))])
        for relative, path, _ in items:
            mask_path = (output / relative).with_suffix(MASK_SUFFIX)
            if relative in counts:
                row = counts[relative]
            elif mask_path.is_file():
                row = mask_counts(np.asarray(Image.open(mask_path)), num_classes)
            else:  # Failed to read.
                continue
            writer.writerow([str(path), str(mask_path.relative_to(output))] + row)


def text_masker(config, workdir, source, mesh):
    """(images uint8 (N, S, S, 3), reports, batch size) -> p_text (batch size, S, S), a device array: the text
    masks of a checkpoint whose mean-teacher run had text guidance; None for other checkpoints."""
    from amvlm_jax.train import ssl

    if "generator" not in checkpoint.saved_entries(source):
        return None
    guidance = ssl.TextGuidance(config, workdir, mesh, source)
    trained = ssl.restore_generator(guidance, source, mesh)

    @jax.jit
    def masks(frozen, trained, images, tokens):
        x = images.astype(np.float32) / 255.0
        return ssl.text_mask_outputs(guidance, trained, frozen, x, tokens)[1]["p_text"]

    def run(images, reports, batch_size):  # Dispatched, not awaited; its first len(images) rows are theirs.
        rows = np.resize(np.arange(len(images)), batch_size)
        tokens = guidance.tokenizer([reports[i] or "" for i in rows])
        batch = pipeline.replicated_to_global(mesh, {"image": images[rows], **tokens})
        return masks(guidance.variables, trained, batch.pop("image"), batch)

    return run
