"""DICOM input: display values (modality rescale, VOI LUT / window, MONOCHROME1 inverted), the folder layout
and predict's reader, and the files refused (multi-frame, undecodable compression, pydicom missing)."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from extract.datasets import (DatasetError, MissingExtraError, check_files, decode_image, decode_mask, is_dicom,
                              open_dataset, read_image, resize_image, synthetic_sample)
from extract.run import ExtractConfig, run_extract
from tests.helpers import arrays, assert_same, quiet

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import (ExplicitVRLittleEndian, JPEG2000Lossless, SecondaryCaptureImageStorage,  # noqa: E402
                         generate_uid)

SLOPE, INTERCEPT, CENTER, WIDTH = 2, -1000, 500, 1001  # window [0, 1000) of the rescaled values


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", bits: int | None = None,
                **elements: object) -> Path:
    """A single file (several frames when ``pixels`` is 3-D and grey) in explicit VR little endian."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.set_pixel_data(pixels, photometric, bits or pixels.dtype.itemsize * 8)
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def windowed(raw: np.ndarray) -> np.ndarray:
    """By hand: rescaled m = 2 raw - 1000; DICOM's linear window (centre c - 0.5, width w - 1) onto 0..255."""
    m = raw.astype(np.float64) * SLOPE + INTERCEPT
    return np.clip(np.rint(((m - (CENTER - 0.5)) / (WIDTH - 1) + 0.5) * 255), 0, 255).astype(np.uint8)


def raw12(i: int, size: int = 48) -> np.ndarray:
    """12-bit stored values from a synthetic image; the window cuts both ends (some black, some white)."""
    grey = np.asarray(synthetic_sample(3, "train", i, size).image)[..., 1].astype(np.uint16)
    return grey * 3 + np.arange(size, dtype=np.uint16)[None, :] * 4  # 0 .. ~950 → rescaled -1000 .. ~900


def x_ray(path: Path, raw: np.ndarray, photometric: str = "MONOCHROME2") -> Path:
    return write_dicom(path, raw, photometric, 12, RescaleSlope=SLOPE, RescaleIntercept=INTERCEPT,
                       WindowCenter=CENTER, WindowWidth=WIDTH)


def rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=2)


def test_rescale_and_window(tmp_path: Path) -> None:
    raw = raw12(0)
    expected = windowed(raw)
    assert 0 < (expected == 0).sum() < expected.size and (expected == 255).sum() < expected.size
    image, note = decode_image(x_ray(tmp_path / "a.dcm", raw))
    np.testing.assert_array_equal(image, rgb(expected))
    assert image.dtype == np.uint8 and note == "DICOM MONOCHROME2: window to 8 bits, grey replicated to RGB"


def test_monochrome1_is_the_inverted_monochrome2(tmp_path: Path) -> None:
    raw = raw12(1)
    mono2, _ = decode_image(x_ray(tmp_path / "two.dcm", raw))
    mono1, note = decode_image(x_ray(tmp_path / "one.dcm", raw, "MONOCHROME1"))
    np.testing.assert_array_equal(mono1, 255 - mono2)
    np.testing.assert_array_equal(mono1[..., 0], 255 - windowed(raw))
    assert "inverted" in note


def test_no_window_is_the_min_max_of_the_rescaled_values(tmp_path: Path) -> None:
    raw = raw12(2)
    m = raw * 0.5 + 7.0
    expected = np.rint((m - m.min()) / (m.max() - m.min()) * 255).astype(np.uint8)
    image, note = decode_image(write_dicom(tmp_path / "b.dicom", raw, "MONOCHROME2", 12,
                                           RescaleSlope=0.5, RescaleIntercept=7))
    np.testing.assert_array_equal(image, rgb(expected))
    assert "min-max" in note


def test_voi_lut_is_preferred_to_the_window(tmp_path: Path) -> None:
    raw = np.asarray(synthetic_sample(3, "train", 0, 32).image)[..., 0].copy()  # 8-bit stored values
    lut = (np.arange(256) ** 2 // 16 + 100).astype(np.uint16)  # 100 .. 4164 of 16 bits: its range is 0..255
    item = Dataset()
    item.LUTDescriptor = [256, 0, 16]
    item.add_new("LUTData", "US", lut.tolist())
    path = write_dicom(tmp_path / "c.dcm", raw, "MONOCHROME2", 8, VOILUTSequence=[item],
                       WindowCenter=10, WindowWidth=2)
    expected = np.rint((lut[raw] - 100.0) / (lut.max() - 100.0) * 255).astype(np.uint8)
    image, note = decode_image(path)
    np.testing.assert_array_equal(image, rgb(expected))
    assert note.startswith("DICOM MONOCHROME2: VOI LUT")


def test_rgb_and_masks(tmp_path: Path) -> None:
    s = synthetic_sample(3, "train", 0, 40)
    colour = np.asarray(s.image)
    image, note = decode_image(write_dicom(tmp_path / "rgb.dcm", colour, "RGB"))
    np.testing.assert_array_equal(image, colour)
    assert note is None
    mask = np.asarray(s.mask)
    np.testing.assert_array_equal(decode_mask(write_dicom(tmp_path / "m.dcm", mask * 255)), mask)
    np.testing.assert_array_equal(decode_mask(write_dicom(tmp_path / "m16.dcm", mask.astype(np.uint16))), mask)


def test_refused_files_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    frames = np.stack([raw12(0, 32)] * 2)
    multi = write_dicom(tmp_path / "cine.dcm", frames, "MONOCHROME2", 12)
    with pytest.raises(DatasetError, match=r"cine\.dcm: multi-frame DICOM \(2 frames\) is not supported"):
        decode_image(multi)

    packed = x_ray(tmp_path / "j2k.dcm", raw12(0, 32))
    ds = pydicom.dcmread(packed)
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51 not a codestream"])
    ds.save_as(packed, enforce_file_format=True)
    with pytest.raises(DatasetError, match=r"j2k\.dcm: cannot decode DICOM pixel data compressed as JPEG 2000 "
                                           r"Image Compression \(Lossless Only\) \(1\.2\.840\.10008\.1\.2\.4\.90\)"):
        decode_image(packed)

    whole = x_ray(tmp_path / "short.dcm", raw12(0, 32)).read_bytes()
    (tmp_path / "short.dcm").write_bytes(whole[:-100])
    with pytest.raises(DatasetError, match=r"short\.dcm: cannot decode DICOM pixel data \(The number of bytes"):
        decode_image(tmp_path / "short.dcm")
    (tmp_path / "short.dcm").write_bytes(whole[:300])
    with pytest.raises(DatasetError, match=r"short\.dcm: DICOM file without pixel data"):
        decode_mask(tmp_path / "short.dcm")
    (tmp_path / "text.dcm").write_text("not DICOM")
    with pytest.raises(DatasetError, match=r"text\.dcm: cannot read mask as DICOM \(File is missing"):
        decode_mask(tmp_path / "text.dcm")

    plain = x_ray(tmp_path / "plain.dcm", raw12(0, 32))
    monkeypatch.setitem(sys.modules, "pydicom", None)  # as if the dicom extra were not installed
    with pytest.raises(MissingExtraError, match=r"plain\.dcm: reading DICOM files needs pydicom: "
                                                r"pip install 'textdiff\[dicom\]'"):
        read_image(plain, 8)


def _write_folder(root: Path, dicom: bool) -> Path:
    """4 X-rays (2 MONOCHROME1), texts and masks; as DICOMs (one with no extension, one mask a DICOM) or as
    the PNGs of the values they display."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = [["image", "text", "split"]]
    for i, split in enumerate(["train", "train", "val", "test"]):
        s = synthetic_sample(3, "train", i, 48)
        raw, photometric = raw12(i), ("MONOCHROME1" if i % 2 else "MONOCHROME2")
        shown = windowed(raw) if photometric == "MONOCHROME2" else 255 - windowed(raw)
        name = f"case{i}" + (".dcm" if i != 2 else "")  # case2: a DICOM file with no extension
        if dicom:
            x_ray(root / "images" / name, raw, photometric)
        else:
            Image.fromarray(shown).save(root / "images" / f"case{i}.png")
        if dicom and i == 3:
            write_dicom(root / "masks" / "case3.dcm", np.asarray(s.mask) * 255)
        else:
            Image.fromarray(np.asarray(s.mask) * 255).save(root / "masks" / f"case{i}.png")
        rows.append([f"case{i}", s.text, split])
    with open(root / "texts.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return root


def test_a_dicom_folder_extracts_like_its_pngs(tiny_unet: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    dicoms, pngs = _write_folder(tmp_path / "dicom", True), _write_folder(tmp_path / "png", False)
    ds = open_dataset("folder", dicoms)
    assert [(it.id, it.image_path.name) for it in ds.items] == [
        ("case0", "case0.dcm"), ("case1", "case1.dcm"), ("case2", "case2"), ("case3", "case3.dcm")]
    assert is_dicom(dicoms / "images" / "case2") and not is_dicom(pngs / "images" / "case2.png")
    _, notes = check_files(ds)
    assert {what for _, what in notes} == {
        "DICOM MONOCHROME2: window to 8 bits, grey replicated to RGB",
        "DICOM MONOCHROME1: window to 8 bits, inverted, grey replicated to RGB"}

    def extract(root: Path) -> dict[str, np.ndarray]:
        cfg = ExtractConfig(dataset="folder", data_root=root, unet=str(tiny_unet / "adm_tiny.pt"),
                            unet_flags=tiny_unet / "adm_tiny_flags.json", text_encoder="minilm", size=32,
                            steps=(50,), blocks=(4,), cache_dir=tmp_path / f"cache-{root.name}")
        return arrays(run_extract(cfg, console=quiet()))

    from_dicom = extract(dicoms)
    assert_same(from_dicom, extract(pngs))
    expected = resize_image(rgb(255 - windowed(raw12(1))), 32)  # case1, MONOCHROME1
    np.testing.assert_array_equal(from_dicom["train/image"][1, 0], expected)
    assert len({from_dicom["train/image"][i, 0].tobytes() for i in range(2)}) == 2

    image, (h, w) = read_image(dicoms / "images" / "case2", 32)  # what predict reads
    np.testing.assert_array_equal(image, from_dicom["val/image"][0, 0])
    assert (h, w) == (48, 48)

    monkeypatch.setitem(sys.modules, "pydicom", None)  # without the extra: one error, not one per file
    with pytest.raises(MissingExtraError, match="pip install"):
        check_files(ds, skip_bad=True)
