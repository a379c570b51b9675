"""Fine-tuning an ImageNet backbone on your own class folders (docs/finetuning.md).

Keras' ResNet50 weights without their top (storage.googleapis.com/tensorflow/keras-applications/resnet/
resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5) fill the backbone, a new head gets the folders' classes;
the head trains alone for two epochs, then everything at a tenth of the head's learning rate. The weights set
data.preprocessing ('caffe' for ResNet50).

    python -m cnn.main --config=configs/finetune.py --workdir=runs/scans \\
      --config.data.path=scans/train \\
      --config.model.pretrained=resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5
"""

from cnn.config import base_config


def get_config():
    config = base_config()
    config.data.name = "image_folder"
    config.data.image_size = (224, 224)
    config.data.channels = 3
    config.data.flip = True
    config.model.layers = ()
    config.model.preset = "resnet50"
    config.model.pretrained = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 1e-3
    config.optimizer.backbone_lr_scale = 0.1
    config.train.freeze_epochs = 2
    config.train.num_epochs = 10
    config.train.batch_size = 32
    return config
