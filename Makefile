# gpt.cpp: `make` builds ./gpt (and ./gpt_cuda where nvcc exists); `make test` builds and runs the tests.
CXX ?= g++
CXXFLAGS ?= -O3 -march=native -std=c++20 -Wall -Wextra
# fp-contract lets the compiler fuse a*b+c into one FMA instruction in the matmul loops (ISO C++ mode turns it off).
CXXFLAGS += -ffp-contract=fast -pthread
# GCC uses 256-bit vectors on AVX-512 machines unless asked; the matmul tiles are sized for 512-bit registers there.
CXXFLAGS += $(if $(shell $(CXX) -march=native -dM -E - </dev/null | grep -q __AVX512F__ && echo avx512),-mprefer-vector-width=512,)
# GCC 12 at -O3 reports false -Wrestrict positives inside libstdc++'s string concatenation ("a" + std::string),
# GCC bug 105651; they point into the standard library, not at our code.
CXXFLAGS += $(if $(shell $(CXX) --version | grep -q ' 12\.' && echo gcc12),-Wno-restrict,)
NVCC ?= $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
CUDA_ARCH ?= sm_90
NVCCFLAGS ?= -O3 -std=c++20 -arch=$(CUDA_ARCH) -Xcompiler -Wall,-Wextra$(if $(filter -Wno-restrict,$(CXXFLAGS)),$(comma)-Wno-restrict,)
comma := ,
DOCTEST_HEADER := $(firstword $(wildcard /usr/include/doctest/doctest.h /usr/local/include/doctest/doctest.h))
CUDA_TARGETS := $(if $(and $(NVCC),$(wildcard gpt_cuda.cu)),gpt_cuda,)

.PHONY: all test clean doctest
all: gpt $(CUDA_TARGETS)

gpt: gpt.cpp
	$(CXX) $(CXXFLAGS) -o $@ gpt.cpp

gpt_cuda: gpt_cuda.cu gpt.cpp
	$(NVCC) $(NVCCFLAGS) -o $@ gpt_cuda.cu -lcublas

# doctest comes from Debian's doctest-dev; install it when the header is missing and we are allowed to.
doctest:
	@if [ -z "$(DOCTEST_HEADER)" ] && [ ! -f /usr/include/doctest/doctest.h ]; then \
		echo "doctest header not found; installing doctest-dev"; \
		if [ "$$(id -u)" = 0 ]; then apt-get install -y doctest-dev >/dev/null || (apt-get update >/dev/null && apt-get install -y doctest-dev >/dev/null); \
		else sudo apt-get install -y doctest-dev >/dev/null; fi || { echo "error: please install doctest (apt-get install doctest-dev)"; exit 1; }; \
	fi

tests: tests.cpp gpt.cpp | doctest
	$(CXX) $(CXXFLAGS) -o $@ tests.cpp

tests_cuda: tests.cpp gpt.cpp gpt_cuda.cu | doctest
	$(NVCC) $(NVCCFLAGS) -DGPT_CUDA_TESTS -x cu -o $@ tests.cpp -lcublas

test: tests $(if $(CUDA_TARGETS),tests_cuda,)
	./tests
	$(if $(CUDA_TARGETS),./tests_cuda,)

clean:
	rm -f gpt gpt_cuda tests tests_cuda tests_asan
