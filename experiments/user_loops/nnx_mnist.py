"""A Flax NNX MNIST training script in the shape of the Flax NNX MNIST tutorial (CNN
with Dropout, nnx.Optimizer with AdamW, nnx.MultiMetric, 1200 steps of 32 images, eval
every 200), written from its description, with a BatchNorm after the first convolution
so that the model keeps statistics. ``nnx_mnist_hf.py`` is this file with Hyperflows in;
the diff between the two is what a user changes (docs/journal.md)."""

import types
from functools import partial

import numpy as np
import optax
from flax import nnx


def default_config():
  return types.SimpleNamespace(train_steps=1200, eval_every=200, batch_size=32,
                               learning_rate=0.005, momentum=0.9)


class CNN(nnx.Module):
  """A simple CNN model."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 32, kernel_size=(3, 3), rngs=rngs)
    self.batch_norm = nnx.BatchNorm(32, rngs=rngs)
    self.conv2 = nnx.Conv(32, 64, kernel_size=(3, 3), rngs=rngs)
    self.avg_pool = partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
    self.linear1 = nnx.Linear(3136, 256, rngs=rngs)
    self.dropout = nnx.Dropout(rate=0.1, rngs=rngs)
    self.linear2 = nnx.Linear(256, 10, rngs=rngs)

  def __call__(self, x):
    x = self.avg_pool(nnx.relu(self.batch_norm(self.conv1(x))))
    x = self.avg_pool(nnx.relu(self.conv2(x)))
    x = x.reshape(x.shape[0], -1)  # flatten
    x = self.dropout(nnx.relu(self.linear1(x)))
    x = self.linear2(x)
    return x


def loss_fn(model: CNN, batch):
  logits = model(batch['image'])
  loss = optax.softmax_cross_entropy_with_integer_labels(
    logits=logits, labels=batch['label']
  ).mean()
  return loss, logits


@nnx.jit
def train_step(model: CNN, optimizer: nnx.Optimizer, metrics: nnx.MultiMetric, batch):
  """Train for a single step."""
  grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
  (loss, logits), grads = grad_fn(model, batch)
  metrics.update(loss=loss, logits=logits, labels=batch['label'])  # In-place updates.
  optimizer.update(model, grads)  # In-place updates.


@nnx.jit
def eval_step(model: CNN, metrics: nnx.MultiMetric, batch):
  loss, logits = loss_fn(model, batch)
  metrics.update(loss=loss, logits=logits, labels=batch['label'])  # In-place updates.


def batches(npz_path, batch_size, train_steps):
  """Shuffled training batches and the test batches, from an .npz of uint8 MNIST."""
  data = np.load(npz_path)
  def split(x, y):
    return {'image': np.float32(x[..., None]) / 255, 'label': np.int32(y)}
  train, test = split(data['x_train'], data['y_train']), split(data['x_test'], data['y_test'])
  order = np.random.default_rng(0).permutation(len(train['label']))
  train_ds = [{k: v[order[i * batch_size:(i + 1) * batch_size]] for k, v in train.items()}
              for i in range(train_steps)]
  n_test = len(test['label'])
  test_ds = [{k: v[i:i + 1000] for k, v in test.items()} for i in range(0, n_test, 1000)]
  return train_ds, test_ds


def train_and_evaluate(config, npz_path):
  train_ds, test_ds = batches(npz_path, config.batch_size, config.train_steps)
  model = CNN(rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adamw(config.learning_rate, config.momentum),
                            wrt=nnx.Param)
  metrics = nnx.MultiMetric(
    accuracy=nnx.metrics.Accuracy(),
    loss=nnx.metrics.Average('loss'),
  )
  history = {'train_accuracy': [], 'test_accuracy': []}
  for step, batch in enumerate(train_ds):
    model.train()  # Dropout on, BatchNorm on batch statistics.
    train_step(model, optimizer, metrics, batch)

    if step > 0 and (step % config.eval_every == 0 or step == config.train_steps - 1):
      history['train_accuracy'].append(float(metrics.compute()['accuracy']))
      metrics.reset()
      model.eval()  # Dropout off, BatchNorm on its running statistics.
      for test_batch in test_ds:
        eval_step(model, metrics, test_batch)
      history['test_accuracy'].append(float(metrics.compute()['accuracy']))
      metrics.reset()
      print(f"step: {step}, train accuracy: {history['train_accuracy'][-1] * 100:.2f}, "
            f"test accuracy: {history['test_accuracy'][-1] * 100:.2f}")
  return {'test_accuracy': history['test_accuracy'][-1],
          'train_accuracy': history['train_accuracy'][-1]}
