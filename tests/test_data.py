import pytest
import torch

from lightning_tda.data import BatchParseError, BatchParser, DigitsDataModule, dataset_fingerprint, parse_batch


def test_parser_accepts_tuples_dicts_and_batch_fn():
    x, y = torch.zeros(2, 3), torch.tensor([1, 2])
    assert parse_batch((x, y, "extra"))[1] is y
    assert parse_batch({"x": x, "y": y})[0] is x
    assert BatchParser(x_key="img", y_key="lbl")({"img": x, "lbl": y})[1] is y
    assert parse_batch({"a": (x, y)}, batch_fn=lambda b: b["a"])[0] is x


def test_unparseable_batch_hints_batch_fn():
    with pytest.raises(BatchParseError, match="batch_fn"):
        parse_batch({"image": torch.zeros(1), "label": torch.zeros(1)})
    with pytest.raises(BatchParseError, match="batch_fn"):
        parse_batch(torch.zeros(3))


def test_digits_split_is_fixed_and_fingerprints_differ():
    a, b = DigitsDataModule(), DigitsDataModule()
    a.setup(), b.setup()
    assert len(a.train_dataset) + len(a.val_dataset) == 1797
    assert torch.equal(a.train_dataset.images, b.train_dataset.images)
    assert a.train_dataset.images.shape[1:] == (1, 8, 8)
    fa = dataset_fingerprint(a.recording_dataset("train"))
    assert fa == dataset_fingerprint(b.recording_dataset("train"))
    assert fa != dataset_fingerprint(DigitsDataModule(split_seed=1).recording_dataset("train"))


def test_augmentation_only_in_training_view():
    dm = DigitsDataModule(augment=True)
    dm.setup()
    view = dm.recording_dataset("train")
    assert torch.equal(view[0][0], dm.train_dataset.images[0])
