from setuptools import find_packages, setup

with open("README.rst", encoding="utf-8") as f:
    longDescription = f.read()

setup(
    name="relaynet",
    version="0.1.0.dev0",
    description="A self-hosted relay that speaks the Azure Relay Hybrid Connections protocol, and a Twisted framework around it.",
    long_description=longDescription,
    long_description_content_type="text/x-rst",
    license="MIT",
    python_requires=">=3.11",
    packages=find_packages(include=["relaynet", "relaynet.*"]) + ["twisted.plugins"],
    package_data={
        "relaynet": ["py.typed"],
        "relaynet.test": ["node/package.json", "node/package-lock.json", "node/*.js", "node/empty-http/*"],
    },
    install_requires=[
        "twisted[tls]>=24.7.0",
        "autobahn>=24.4.2",
        "service-identity>=24.1.0",
        "pyopenssl>=24.0.0",
        "zope.interface>=6.0",
    ],
    entry_points={"console_scripts": ["relaynet = relaynet.cli:main"]},
    extras_require={
        # hypothesis: property tests of token parsing and path handling.
        "test": ["hypothesis>=6.100"],
    },
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3.11",
        "Topic :: Internet",
    ],
)
