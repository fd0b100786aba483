"""`--loader torchvision` on image folders: the baseline transform is torchvision's own, image for image."""
import pytest
import torch
from torchvision.transforms import v2

from pipelines.folder import RRC_RATIO, RRC_SCALE, load_folder
from pipelines.torchvision_folder import TorchvisionFolderLoader, natural_transform
from pipelines.folder import natural_augment
from tests.folder_helpers import make_tree, reference_eval
from tests.loader_helpers import MEAN, STD, epoch, spec


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    splits, _, _ = load_folder(make_tree(tmp_path_factory.mktemp("tv") / "tree", num_classes=3, per_class=10))
    return splits["train"]


def test_evaluation_is_torchvisions_transform_exactly(tree):
    """Every mode and size, including 1.5x-wide images: the same pixels as Resize(256-rule) + CenterCrop."""
    loader = TorchvisionFolderLoader(tree.files, tree.labels, spec(batch_size=7, image_size=24, num_threads=0))
    batches = epoch(loader)
    images = torch.cat([x for x, _ in batches])
    assert len(loader) == len(batches) == 5 and images.shape == (30, 3, 24, 24)
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert torch.cat([y for _, y in batches]).tolist() == tree.labels.tolist()
    reference = torch.stack([reference_eval(f, 24, MEAN, STD) for f in tree.files])
    # the same uint8 pixels; only the scaling to float rounds differently (ToDtype vs / 255)
    torch.testing.assert_close(images, reference, rtol=0, atol=1e-5)


def test_training_crops_at_random_and_drops_the_partial_batch(tree):
    loader = TorchvisionFolderLoader(tree.files, tree.labels, spec(batch_size=8, train=True, augment="flip-crop",
                                                                   image_size=24, num_threads=0))
    first, second = epoch(loader), epoch(loader)
    assert len(loader) == len(first) == 3 and all(x.shape == (8, 3, 24, 24) for x, _ in first)
    assert not torch.equal(first[0][1], second[0][1])  # a new order every epoch
    again = epoch(TorchvisionFolderLoader(tree.files, tree.labels, spec(batch_size=8, train=True, augment="flip-crop",
                                                                        image_size=24, num_threads=0)))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))  # the seed decides everything
    # the random-resized crop is torchvision's, with its bounds
    transform = natural_transform(natural_augment("flip-crop", True), image_size=24, mean=MEAN, std=STD)
    crop = transform.transforms[0]
    assert isinstance(crop, v2.RandomResizedCrop) and crop.scale == RRC_SCALE and crop.ratio == RRC_RATIO


def test_training_without_augmentation_is_the_evaluation_view(tree):
    """--augment none (the feature cache's setting): the images are the evaluation view, reordered."""
    make = lambda **kw: TorchvisionFolderLoader(tree.files, tree.labels, spec(image_size=24, num_threads=0, **kw))
    evaluation = torch.cat([x for x, _ in epoch(make(batch_size=10))])
    trained = epoch(make(batch_size=10, train=True, augment="none"))
    images, labels = torch.cat([x for x, _ in trained]), torch.cat([y for _, y in trained])
    index = [next(j for j in range(len(evaluation)) if torch.equal(image, evaluation[j])) for image in images]
    assert sorted(index) == list(range(30)) and index != list(range(30))
    assert labels.tolist() == tree.labels[index].tolist()
