package qupath.lib.objects

import qupath.lib.objects.classes.PathClass
import qupath.lib.roi.interfaces.ROI

/** STAND-IN for QuPath's PathObjects factory (not QuPath): same static signatures. */
class PathObjects {
    static PathObject createAnnotationObject(ROI roi) { return new PathAnnotationObject(roi, null) }

    static PathObject createAnnotationObject(ROI roi, PathClass pathClass) {
        return new PathAnnotationObject(roi, pathClass)
    }

    static PathObject createDetectionObject(ROI roi) { return new PathDetectionObject(roi, null) }

    static PathObject createDetectionObject(ROI roi, PathClass pathClass) {
        return new PathDetectionObject(roi, pathClass)
    }
}
