from setuptools import find_packages, setup

setup(
    name="simclic-tf",
    version="0.1.0",
    description="SimCLIC: self-supervised image representations by predicting a "
                "perturbed representation, in Keras 3 / TensorFlow",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["simclic_tf", "simclic_tf.*", "kernels", "tuning"]),
    # The C++ custom ops ship as source, compiled on first use (kernels/build.py).
    package_data={"kernels": ["cc/*.cc", "cc/*.h"], "simclic_tf": ["recipes/*.json"]},
    py_modules=["train"],
    python_requires=">=3.10",
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "keras>=3.10,<4",
        "tensorflow-datasets>=4.9.9,<5",
        "importlib_resources",  # tfds's download_and_prepare imports it without requiring it
        "keras-tuner>=1.4.7,<2",
        "tensorboard>=2.21,<2.22",
        "scikit-learn>=1.5,<2",
        "matplotlib>=3.8,<4",  # the report's PNG pictures
        "numpy>=1.26",
    ],
    extras_require={
        "test": ["pytest>=8"],
        "gpu": ["tensorflow[and-cuda]>=2.21,<2.22"],
    },
    entry_points={"console_scripts": ["simclic-train=train:main"]},
)
