"""A Flax Linen MNIST training script in the shape of the Flax examples' mnist/train.py
(CNN, TrainState, apply_model / update_model / train_epoch, SGD with momentum), written
from its description. ``linen_mnist_hf.py`` is this file with Hyperflows in; the diff
between the two is what a user changes (docs/journal.md)."""

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state


def default_config():
  return types.SimpleNamespace(learning_rate=0.1, momentum=0.9, batch_size=128,
                               num_epochs=1)


class CNN(nn.Module):
  """A simple CNN model."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(features=32, kernel_size=(3, 3))(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = nn.Conv(features=64, kernel_size=(3, 3))(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))  # flatten
    x = nn.Dense(features=256)(x)
    x = nn.relu(x)
    x = nn.Dense(features=10)(x)
    return x


@jax.jit
def apply_model(state, images, labels):
  """Computes gradients, loss and accuracy for a single batch."""

  def loss_fn(params):
    logits = state.apply_fn({'params': params}, images)
    one_hot = jax.nn.one_hot(labels, 10)
    loss = jnp.mean(optax.softmax_cross_entropy(logits=logits, labels=one_hot))
    return loss, logits

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, logits), grads = grad_fn(state.params)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
  return grads, loss, accuracy


@jax.jit
def update_model(state, grads):
  return state.apply_gradients(grads=grads)


def train_epoch(state, train_ds, batch_size, rng):
  """Train for a single epoch."""
  train_ds_size = len(train_ds['image'])
  steps_per_epoch = train_ds_size // batch_size

  perms = jax.random.permutation(rng, len(train_ds['image']))
  perms = perms[: steps_per_epoch * batch_size]  # skip incomplete batch
  perms = perms.reshape((steps_per_epoch, batch_size))

  epoch_loss, epoch_accuracy = [], []
  for perm in perms:
    batch_images = train_ds['image'][perm, ...]
    batch_labels = train_ds['label'][perm, ...]
    grads, loss, accuracy = apply_model(state, batch_images, batch_labels)
    state = update_model(state, grads)
    epoch_loss.append(loss)
    epoch_accuracy.append(accuracy)
  return state, np.mean(epoch_loss), np.mean(epoch_accuracy)


def get_datasets(npz_path):
  """MNIST from an .npz file (x_train, y_train, x_test, y_test, uint8) as float images."""
  data = np.load(npz_path)
  def split(x, y):
    return {'image': jnp.float32(x[..., None]) / 255.0, 'label': jnp.int32(y)}
  return split(data['x_train'], data['y_train']), split(data['x_test'], data['y_test'])


def create_train_state(rng, config):
  """Creates initial `TrainState`."""
  cnn = CNN()
  params = cnn.init(rng, jnp.ones([1, 28, 28, 1]))['params']
  tx = optax.sgd(config.learning_rate, config.momentum)
  return train_state.TrainState.create(apply_fn=cnn.apply, params=params, tx=tx)


def train_and_evaluate(config, npz_path):
  """Trains and evaluates; returns the final test metrics."""
  train_ds, test_ds = get_datasets(npz_path)
  rng = jax.random.key(0)
  rng, init_rng = jax.random.split(rng)
  state = create_train_state(init_rng, config)

  for epoch in range(1, config.num_epochs + 1):
    rng, input_rng = jax.random.split(rng)
    state, train_loss, train_accuracy = train_epoch(state, train_ds, config.batch_size,
                                                    input_rng)
    _, test_loss, test_accuracy = apply_model(state, test_ds['image'], test_ds['label'])
    print(f'epoch:{epoch:3}, train_loss: {train_loss:.4f}, '
          f'train_accuracy: {train_accuracy * 100:.2f}, test_loss: {test_loss:.4f}, '
          f'test_accuracy: {test_accuracy * 100:.2f}')
  return {'test_accuracy': float(test_accuracy)}
