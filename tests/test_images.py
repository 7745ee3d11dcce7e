"""medvlp.data.images on real files bundled with pydicom, nibabel and scikit-image, plus bad inputs."""
from __future__ import annotations

import io
import os
import warnings

import numpy as np
import pytest
from PIL import Image

from medvlp.data.images import (
    TECHNICAL_TAGS,
    detect_format,
    read_image,
    read_image_with_info,
)
from medvlp.errors import DataError

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file


def dcm(name):
    with warnings.catch_warnings():  # listing pydicom's optional download-only files warns
        warnings.simplefilter("ignore")
        return get_testdata_file(name)


def load(name):
    return pydicom.dcmread(dcm(name))


def test_ct_rescale_and_minmax_without_window():
    ds = load("CT_small.dcm")
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    img, info = read_image_with_info(dcm("CT_small.dcm"))
    assert img.shape == (128, 128) and img.dtype == np.float32
    assert info.value_range == (hu.min(), hu.max()) and info.format == "dicom"
    np.testing.assert_allclose(img, (hu - hu.min()) / (hu.max() - hu.min()), atol=1e-6)
    assert info.spacing == tuple(float(v) for v in ds.PixelSpacing)
    # an explicit window in Hounsfield units replaces the range: soft tissue (40, 400)
    soft = read_image(dcm("CT_small.dcm"), window=(40, 400))
    np.testing.assert_allclose(soft, np.clip((hu + 160) / 400, 0, 1), atol=1e-6)


def test_mr_file_window_against_the_dicom_linear_formula():
    ds = load("MR_small.dcm")
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    x = ds.pixel_array.astype(float)
    expected = np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1)  # PS3.3 C.11.2.1.2, mapped to [0, 1]
    np.testing.assert_allclose(read_image(dcm("MR_small.dcm")), expected, atol=1e-5)
    ignored, info = read_image_with_info(dcm("MR_small.dcm"), window="minmax")
    assert info.value_range == (x.min(), x.max()) and ignored.min() == 0 and ignored.max() == 1
    u8 = read_image(dcm("MR_small.dcm"), out="uint8")
    u16 = read_image(dcm("MR_small.dcm"), out="uint16")
    assert u8.dtype == np.uint8 and u16.dtype == np.uint16
    np.testing.assert_array_equal(u8, np.rint(expected * 255).astype(np.uint8))
    assert np.abs(u16 / 65535 - expected).max() < 1e-4


def test_voi_lut_sequence_is_used(tmp_path):
    ds = load("MR_small.dcm")
    item = pydicom.Dataset()
    item.LUTDescriptor = [4096, 0, 12]
    item.add_new("LUTData", "US", [i // 2 for i in range(4096)])
    ds.VOILUTSequence = pydicom.Sequence([item])
    ds.save_as(tmp_path / "lut.dcm")
    img, info = read_image_with_info(tmp_path / "lut.dcm")
    assert info.value_range == (0, 2047)
    np.testing.assert_allclose(img, (ds.pixel_array // 2) / 2047, atol=1e-6)


def test_monochrome1_is_inverted(tmp_path):
    # no MONOCHROME1 file ships with pydicom: the real MR slice relabelled as MONOCHROME1
    ds = load("MR_small.dcm")
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "m1.dcm")
    inv, info = read_image_with_info(tmp_path / "m1.dcm")
    assert info.inverted and info.photometric == "MONOCHROME1"
    np.testing.assert_allclose(inv, 1 - read_image(dcm("MR_small.dcm")), atol=1e-6)


def test_multiframe_default_middle_and_index():
    ds = load("rtdose.dcm")  # 15 frames
    frames = ds.pixel_array.astype(float)
    img, info = read_image_with_info(dcm("rtdose.dcm"), window="minmax")
    assert info.n_frames == 15 and info.frame == 7
    np.testing.assert_allclose(img, (frames[7] - frames[7].min()) / np.ptp(frames[7]), atol=1e-6)
    last, info = read_image_with_info(dcm("rtdose.dcm"), frame=-1, window="minmax")
    assert info.frame == 14 and not np.allclose(last, img)
    with pytest.raises(DataError, match="frame index 15 is out of range.*15 frames"):
        read_image(dcm("rtdose.dcm"), frame=15)


def test_ybr_and_rgb_give_the_same_rgb_picture():
    ref = read_image(dcm("SC_rgb_dcmtk_+eb+cr.dcm"))  # uncompressed RGB
    assert ref.shape == (100, 100, 3)
    for name in ("SC_ybr_full_422_uncompressed.dcm", "SC_rgb_jpeg_dcmtk.dcm"):  # YBR_FULL(_422), JPEG
        assert load(name).PhotometricInterpretation.startswith("YBR")
        img, info = read_image_with_info(dcm(name))
        assert info.photometric == "RGB" and np.abs(img - ref).max() < 8 / 255
    gray = read_image(dcm("SC_rgb_dcmtk_+eb+cr.dcm"), channels="gray")
    np.testing.assert_allclose(gray, ref @ np.array([0.299, 0.587, 0.114]), atol=1e-6)
    video, info = read_image_with_info(dcm("examples_ybr_color.dcm"), frame=0)  # 30-frame YBR JPEG
    assert video.shape == (240, 320, 3) and info.n_frames == 30 and info.frame == 0


def test_palette_color():
    img, info = read_image_with_info(dcm("examples_palette.dcm"))
    assert img.shape == (350, 800, 3) and info.photometric == "RGB" and info.bits == 16
    assert np.abs(img[..., 0] - img[..., 2]).max() > 0.1  # really coloured


def test_compressed_decodes_or_names_the_missing_decoder():
    try:
        img = read_image(dcm("JPEG-lossy.dcm"))  # JPEG Extended 12-bit: Pillow cannot decode it
    except DataError as exc:
        msg = str(exc)
        assert "JPEG-lossy.dcm" in msg and "JPEG Extended" in msg and "pip install pylibjpeg" in msg
    else:  # pylibjpeg or gdcm installed
        assert img.ndim == 2 and 0 <= img.min() < img.max() <= 1
    img = read_image(dcm("MR_small_RLE.dcm"))  # RLE: decoded by pydicom itself
    np.testing.assert_allclose(img, read_image(dcm("MR_small.dcm")), atol=1e-6)


def test_unsupported_transfer_syntax(tmp_path):
    ds = load("JPEG-lossy.dcm")
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 video: no decoder exists
    ds.save_as(tmp_path / "video.dcm")
    with pytest.raises(DataError, match=r"video\.dcm: unsupported DICOM transfer syntax MPEG2.*gdcmconv"):
        read_image(tmp_path / "video.dcm")


def test_metadata_allow_list_never_has_patient_identifiers(tmp_path):
    ds = load("CT_small.dcm")
    ds.PatientName, ds.PatientID = "Doe^Jane", "PID-424242"
    ds.PatientBirthDate, ds.StudyDate, ds.InstitutionName = "19700101", "20240102", "General Hospital"
    ds.ViewPosition = "PA"
    ds.save_as(tmp_path / "patient.dcm")
    _, info = read_image_with_info(tmp_path / "patient.dcm")
    assert set(info.tags) <= {*TECHNICAL_TAGS, "TransferSyntaxUID"}
    assert info.tags["Modality"] == "CT" and info.tags["ViewPosition"] == "PA" and info.tags["Rows"] == 128
    text = repr(info)
    for secret in ("Doe", "Jane", "PID-424242", "19700101", "20240102", "General Hospital"):
        assert secret not in text


def test_dicom_bad_inputs(tmp_path):
    ds = load("CT_small.dcm")
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm")
    with pytest.raises(DataError, match=r"nopix\.dcm: DICOM without pixel data"):
        read_image(tmp_path / "nopix.dcm")
    with pytest.raises(DataError, match="pixel data cannot be decoded"):
        read_image(dcm("MR_truncated.dcm"))  # real file whose pixel data is cut short
    (tmp_path / "fake.dcm").write_text("not a dicom file at all")
    with pytest.raises(DataError, match=r"fake\.dcm: not a DICOM file"):
        read_image(tmp_path / "fake.dcm")


def _encode(arr, fmt):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def test_png_8_and_16_bit(tmp_path):
    ramp16 = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    (tmp_path / "g16.png").write_bytes(_encode(ramp16, "PNG"))
    img, info = read_image_with_info(tmp_path / "g16.png", out="uint16")
    assert info.bits == 16 and info.value_range == (0, 65535)
    np.testing.assert_array_equal(img, ramp16)  # every 16-bit level kept
    assert len(np.unique(read_image(tmp_path / "g16.png"))) == 4096
    rgb = np.random.default_rng(0).integers(0, 256, (8, 9, 3), dtype=np.uint8)
    (tmp_path / "c.png").write_bytes(_encode(rgb, "PNG"))
    np.testing.assert_array_equal(read_image(tmp_path / "c.png", out="uint8"), rgb)
    assert read_image(tmp_path / "c.png", channels="gray").shape == (8, 9)
    (tmp_path / "noext").write_bytes(_encode(rgb[..., 0], "PNG"))
    assert detect_format(tmp_path / "noext") == "png"
    assert read_image(tmp_path / "noext", channels="rgb").shape == (8, 9, 3)


def test_truncated_png_and_jpg(tmp_path):
    photo = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for fmt, suffix in (("PNG", "png"), ("JPEG", "jpg")):
        data = _encode(photo, fmt)
        (tmp_path / f"ok.{suffix}").write_bytes(data)
        assert read_image(tmp_path / f"ok.{suffix}").shape == (64, 64, 3)
        (tmp_path / f"cut.{suffix}").write_bytes(data[: len(data) // 2])
        with pytest.raises(DataError, match=rf"cut\.{suffix}: corrupt or truncated image"):
            read_image(tmp_path / f"cut.{suffix}")


def test_missing_file_unknown_type_and_bad_options(tmp_path):
    with pytest.raises(DataError, match=r"missing\.png does not exist"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"notes\.txt: unsupported image type '\.txt'.*\.dcm"):
        read_image(tmp_path / "notes.txt")
    with pytest.raises(DataError, match="out='float64'"):
        read_image(dcm("CT_small.dcm"), out="float64")
    with pytest.raises(DataError, match="width > 0"):
        read_image(dcm("CT_small.dcm"), window=(40, 0))


def test_retina_photograph():
    skdata = pytest.importorskip("skimage.data")
    path = os.path.join(os.path.dirname(skdata.__file__), "retina.jpg")  # bundled, not downloaded
    img, info = read_image_with_info(path, out="uint8")
    ref = skdata.retina()
    assert info.format == "jpeg" and img.shape == ref.shape == (1411, 1411, 3)
    assert np.abs(img.astype(int) - ref).mean() < 1.0
    assert img[..., 0].mean() > img[..., 2].mean()  # a fundus is red, not blue


def nii(name):
    pytest.importorskip("nibabel")
    from nibabel.testing import data_path

    return os.path.join(data_path, name)


def test_nifti_real_volumes():
    nib = pytest.importorskip("nibabel")
    vol = np.asanyarray(nib.as_closest_canonical(nib.load(nii("example4d.nii.gz"))).dataobj)[..., 0]
    img, info = read_image_with_info(nii("example4d.nii.gz"))
    assert info.n_frames == vol.shape[2] and info.frame == vol.shape[2] // 2
    expected = vol[:, :, info.frame].T[::-1]
    np.testing.assert_allclose(img, (expected - vol.min()) / np.ptp(vol), atol=1e-6)
    sag, info = read_image_with_info(nii("anatomical.nii"), axis=0, frame=3)
    assert info.frame == 3 and sag.ndim == 2 and sag.max() > 0
    with pytest.raises(DataError, match=r"anatomical\.nii: slice index 99 is out of range"):
        read_image(nii("anatomical.nii"), frame=99)


def test_nifti_orientation_is_canonical(tmp_path):
    nib = pytest.importorskip("nibabel")
    data = np.zeros((4, 5, 6), dtype=np.float32)
    data[0, 4, 2] = 1.0  # RAS+: x=0 is the patient's left-most voxel, y=4 the most anterior
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "ras.nii")
    # the same physical volume stored left-right and anterior-posterior flipped (LPS-like)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:3, 3] = [3, 4, 0]
    nib.save(nib.Nifti1Image(data[::-1, ::-1].copy(), flip), tmp_path / "lps.nii.gz")
    a = read_image(tmp_path / "ras.nii", frame=2)
    b = read_image(tmp_path / "lps.nii.gz", frame=2)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (5, 4) and a[0, 0] == 1.0  # anterior at the top, patient's left at column 0
