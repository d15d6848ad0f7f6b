"""DICOM decoding: every site's conventions end up as display values with bright = dense."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import BasicTextSRStorage, ExplicitVRLittleEndian, generate_uid

from medunic_core.data.dicom import read_dicom, write_dicom
from medunic_core.errors import SiteDataError


def _phantom(dense: int = 3000, background: int = 100) -> np.ndarray:
    """A 32x40 image with a dense rectangle in the middle."""
    arr = np.full((32, 40), background, dtype=np.uint16)
    arr[8:24, 10:30] = dense
    return arr


def _save(ds: Dataset, path: Path, sop_class: str) -> Path:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[path.name])
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path


def test_write_dicom_round_trips_pixels_and_ids(tmp_path: Path) -> None:
    arr = _phantom()
    path = write_dicom(arr, tmp_path / "a.dcm", patient_id="p1", study_id="s1")
    ds = pydicom.dcmread(path)
    assert path.read_bytes()[128:132] == b"DICM"
    assert ds.PatientID == "p1" and ds.StudyID == "s1"
    np.testing.assert_array_equal(ds.pixel_array, arr)
    out, meta = read_dicom(path)
    assert out.dtype == np.float32 and out.shape == (32, 40)
    np.testing.assert_array_equal(out, arr.astype(np.float32))
    assert meta["photometric"] == "MONOCHROME2" and meta["voi"] is None


def test_write_dicom_is_reproducible(tmp_path: Path) -> None:
    a = write_dicom(_phantom(), tmp_path / "one" / "x.dcm", patient_id="p", study_id="s")
    b = write_dicom(_phantom(), tmp_path / "two" / "x.dcm", patient_id="p", study_id="s")
    assert a.read_bytes() == b.read_bytes()
    c = write_dicom(_phantom(dense=2000), tmp_path / "three" / "x.dcm", patient_id="p", study_id="s")
    assert pydicom.dcmread(c).SOPInstanceUID != pydicom.dcmread(a).SOPInstanceUID
    assert pydicom.dcmread(c).StudyInstanceUID == pydicom.dcmread(a).StudyInstanceUID


def test_write_dicom_rejects_values_that_do_not_fit(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bits_stored=8"):
        write_dicom(_phantom(), tmp_path / "x.dcm", bits_stored=8)


def test_read_dicom_inverts_monochrome1(tmp_path: Path) -> None:
    # In MONOCHROME1 low stored values are displayed bright: store dense tissue as 0.
    stored = 3000 - _phantom(dense=3000, background=0)
    out, meta = read_dicom(write_dicom(stored, tmp_path / "m1.dcm", photometric="MONOCHROME1"))
    assert meta["photometric"] == "MONOCHROME1"
    assert out[16, 20] > out[0, 0]
    assert out[16, 20] == out.max() and out[0, 0] == out.min()


def test_read_dicom_applies_rescale_slope_and_intercept(tmp_path: Path) -> None:
    out, meta = read_dicom(write_dicom(_phantom(), tmp_path / "r.dcm", rescale_slope=2.0, rescale_intercept=-1024.0))
    assert out[0, 0] == pytest.approx(100 * 2 - 1024)
    assert out[16, 20] == pytest.approx(3000 * 2 - 1024)
    assert meta["rescale"] == (2.0, -1024.0)


def test_read_dicom_applies_window(tmp_path: Path) -> None:
    arr = _phantom(dense=3000, background=100)
    arr[0, 0] = 1500  # exactly the window centre
    out, meta = read_dicom(write_dicom(arr, tmp_path / "w.dcm", window=(1500.0, 1000.0)))
    assert meta["voi"] == "window"
    assert out[0, 1] == out.min()  # below the window: clipped to the lowest display value
    assert out[16, 20] == out.max()  # above the window: clipped to the highest
    assert out.min() < out[0, 0] < out.max()
    assert out[0, 0] == pytest.approx((out.min() + out.max()) / 2, rel=0.01)


def test_read_dicom_signed_pixels(tmp_path: Path) -> None:
    arr = _phantom().astype(np.int32) - 1000
    out, _ = read_dicom(write_dicom(arr, tmp_path / "s.dcm", bits_stored=12))
    np.testing.assert_array_equal(out, arr.astype(np.float32))


def test_read_dicom_takes_first_frame_of_multiframe(tmp_path: Path) -> None:
    path = write_dicom(_phantom(), tmp_path / "mf.dcm")
    ds = pydicom.dcmread(path)
    frames = np.stack([_phantom(), np.zeros((32, 40), np.uint16)])
    ds.NumberOfFrames = 2
    ds.PixelData = frames.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    out, meta = read_dicom(path)
    assert meta["frames"] == 2 and out.shape == (32, 40)
    np.testing.assert_array_equal(out, _phantom().astype(np.float32))


def test_read_dicom_without_pixel_data_names_file(tmp_path: Path) -> None:
    ds = Dataset()
    ds.Modality = "SR"
    path = _save(ds, tmp_path / "report_sr.dcm", BasicTextSRStorage)
    with pytest.raises(SiteDataError, match=r"report_sr\.dcm.*no pixel data.*Basic Text SR.*drop it"):
        read_dicom(path)


def test_read_dicom_refuses_colour(tmp_path: Path) -> None:
    ds = Dataset()
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = 4, 4
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.zeros((4, 4, 3), np.uint8).tobytes()
    path = _save(ds, tmp_path / "photo.dcm", "1.2.840.10008.5.1.4.1.1.7")
    with pytest.raises(SiteDataError, match=r"photo\.dcm.*not a grayscale.*RGB"):
        read_dicom(path)


def test_read_dicom_corrupt_bytes_name_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.dcm"
    path.write_bytes(b"\x00" * 50 + b"not a dicom at all")
    with pytest.raises(SiteDataError, match=r"broken\.dcm.*not a readable DICOM"):
        read_dicom(path)


def test_read_dicom_zero_window_width_names_file(tmp_path: Path) -> None:
    path = write_dicom(_phantom(), tmp_path / "w0.dcm", window=(1500.0, 0.0))
    with pytest.raises(SiteDataError, match=r"w0\.dcm.*window"):
        read_dicom(path)


def test_read_dicom_truncated_pixel_data_names_file(tmp_path: Path) -> None:
    path = write_dicom(_phantom(), tmp_path / "cut.dcm")
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(SiteDataError, match=r"cut\.dcm"):
        read_dicom(path)


def test_read_dicom_header_only_file_is_reported_as_truncated(tmp_path: Path) -> None:
    path = write_dicom(_phantom(), tmp_path / "header_only.dcm")
    path.write_bytes(path.read_bytes()[:132])
    with pytest.raises(SiteDataError, match=r"header_only\.dcm.*truncated"):
        read_dicom(path)
