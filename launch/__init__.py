"""The accelerate launch configs (``*.yaml``) and launch scripts of the repository. Installed, this folder is the
package ``tokenweave.launch_configs`` (setup.py), so ``--accelerate_config NAME`` finds ``NAME.yaml`` in a wheel
install as in a checkout (:func:`tokenweave.launch.accelerate_configs_dir`)."""
