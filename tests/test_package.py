import actionrec


def test_package_imports_with_version():
    assert actionrec.__version__.count(".") == 2
